"""Training, top to bottom: `train()` starts a run, `resume()` continues one, both call `fit()`.

`fit()` is the loop, in the spirit of nanoGPT's train.py: the schedule, gradient accumulation, clipping, the NaN
guard, logging, validation, best-epoch saving, checkpoints and interrupts are all inline.  Where the loop is lives
in one typed object, `checkpoint.TrainState`, saved whole in every checkpoint.  It talks to the model only
through the backend interface (loracls.backends.base), so it never knows which backend runs.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import torch

from loracls import build, checkpoint, distributed, peft_format
from loracls.atomic import atomic_write_text
from loracls.backends import Classifier
from loracls.checkpoint import TrainState
from loracls.config import RunConfig, TrainSettings, dump_config
from loracls.data import Split, resolved_columns, summary, summary_lines
from loracls.errors import LoraclsError, TrainingInterrupted, first_line
from loracls.finish import finish, predict_split
from loracls.job import Job, prepare
from loracls.report import plural
from loracls.rundir import CONFIG_YAML, TENSORBOARD_DIR, RunDir, model_name
from loracls.tasks import Task
from loracls.teachers import save as save_teachers
from loracls.teachers import teachers_for
from loracls.tblog import open_log


# ---------------------------------------------------------------------------------------------------------------
# The optimizer and its schedule
# ---------------------------------------------------------------------------------------------------------------
def make_optimizer(model: Classifier, t: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over three groups, in this order (fit() finds LoRA's tensors by it): the head, LoRA's A (and DoRA's
    magnitudes), LoRA's B."""
    params = list(model.trainable_named_parameters())
    head = [p for n, p in params if "lora_" not in n]
    a = [p for n, p in params if "lora_" in n and "lora_B" not in n]
    b = [p for n, p in params if "lora_B" in n]
    # LoRA+ (Hayou et al. 2024): B learns faster than A; ratio 1 is plain LoRA
    groups = [{"params": head, "lr": t.lr}, {"params": a, "lr": t.lr},
              {"params": b, "lr": t.lr * t.lora_plus_ratio}]
    # fused AdamW is one kernel on CUDA; on the CPU the foreach path is the fast one
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=t.lr, eps=t.adam_eps, weight_decay=t.weight_decay, **extra)


@dataclass
class Schedule:
    """AdamW and its learning-rate schedule over the whole run."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    head_steps: int
    """The first optimizer steps, which train the head alone (the classifier warm-up); LoRA's gradients are
    dropped during them."""


def make_schedule(model: Classifier, t: TrainSettings, device: torch.device, n_examples: int) -> Schedule:
    """With head_warmup_ratio the head trains alone for that share of the steps, then LoRA starts on a schedule
    (warmup included) of its own over the rest."""
    total_steps = math.ceil(math.ceil(n_examples / t.batch_size) / t.grad_accum) * t.epochs
    optimizer = make_optimizer(model, t, device)
    head = lr_factor(total_steps, int(t.warmup_ratio * total_steps), t.schedule)
    first = int(t.head_warmup_ratio * total_steps)
    rest = lr_factor(total_steps - first, int(t.warmup_ratio * (total_steps - first)), t.schedule)

    def lora(step: int) -> float:
        return 0.0 if step < first else rest(step - first)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [head, lora, lora])
    return Schedule(optimizer, scheduler, total_steps, head_steps=first)


def lr_factor(total_steps: int, warmup_steps: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def log_interval(t: TrainSettings, total_steps: int) -> int:
    """t.log_every, or about 100 points over the run and at least one every 50 steps."""
    return t.log_every or max(1, min(50, math.ceil(total_steps / 100)))


class StopFlag:
    """Ctrl-C and SIGTERM set a flag that the loop reads after each optimizer step; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print("\nloracls: stopping at the next step boundary and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class DeviceSums:
    """The loss and the task's running metric, summed on the device: reading them forces a host sync, so that
    happens only when they are folded into the TrainState (log points and checkpoints).  Also the first step with
    a non-finite loss, found without a sync."""

    def __init__(self, device: torch.device, world: distributed.World, task: Task):
        self.world, self.task = world, task
        self.loss = torch.zeros((), device=device)
        self.hits = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int, counted: bool) -> None:
        """Add a micro-batch's summed loss and running metric (not when it only stands in: counted False)."""
        loss_sum = loss_sum.detach()
        if counted:
            self.loss += loss_sum
            self.hits += self.task.hits(logits.detach(), y)
        self.bad_step.copy_(torch.where((self.bad_step < 0) & ~torch.isfinite(loss_sum),
                                        torch.full_like(self.bad_step, step), self.bad_step))

    def fold_into(self, state: TrainState) -> None:
        """Move the sums (over every process) into `state`; a non-finite loss since the last fold is a
        LoraclsError."""
        self.world.all_sum(self.loss, self.hits)
        self.world.all_max(self.bad_step)
        bad = int(self.bad_step)
        if bad >= 0:
            raise LoraclsError(f"the loss became NaN/inf at optimizer step {bad}; the last good checkpoint is kept; "
                               "lower --lr or check the data, then retrain")
        state.add(float(self.loss), float(self.hits))
        self.loss.zero_()
        self.hits.zero_()


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def default_output_dir(config: RunConfig) -> str:
    return str(Path("runs") / f"{model_name(config.model)}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: RunConfig, *, overwrite: bool = False, allow_pickle: bool = False, progress: bool = True,
          on_epoch: Callable[[int, dict | None], bool] | None = None) -> RunDir:
    """Train a fresh run; returns its run directory.  Raises LoraclsError for anything the user can fix.
    on_epoch(epoch, validation metrics) after each epoch may return True to stop early (a sweep's pruner)."""
    world = distributed.world()
    config = config.with_absolute_paths()  # a run must load from any folder, and never become a hub name
    build.use_threads(config.threads)
    job = prepare(config, allow_pickle)
    facts = _say_what_was_read(config, job, world)
    job.teachers = teachers_for(config, job)  # checked and computed before the run directory exists
    run = world.on_main(lambda: RunDir.create(config.output_dir or default_output_dir(config), overwrite=overwrite),
                        shared=_path)
    run = run if world.is_main else RunDir(Path(run))
    try:
        # The columns training used are stored, so a resume or `evaluate` reads files the same way.
        config = config.with_overrides({"output_dir": str(run.path), **resolved_columns(job.splits)})
        if world.is_main:
            atomic_write_text(run.file(CONFIG_YAML), dump_config(config))
            run.write_labels(job.labels.names, job.labels.values)
            run.write_info(data=facts)
            if job.teachers is not None:
                save_teachers(run, job.teachers)
        return _fit_recording_status(run, config, job, TrainState(), None, progress, on_epoch)
    finally:
        run.release()


def _say_what_was_read(config: RunConfig, job: Job, world: distributed.World) -> dict:
    """The data summary on stderr (rank 0), before anything trains; returns its facts for run.json."""
    facts = summary(job.splits, job.labels, config.data, job.task.name)
    if world.is_main:
        print("\n".join(f"loracls: {line}" for line in summary_lines(facts)), file=sys.stderr)
        rare = _rare_classes(job) if job.task.has_classes else []
        if rare:
            shown = ", ".join(f"{name!r} ({n})" for name, n in rare[:5]) + (" and more" if len(rare) > 5 else "")
            print(f"loracls: warning: {plural(len(rare), 'class', 'classes')} with fewer than {FEW_ROWS} training "
                  f"rows: {shown}; such classes are rarely predicted: add rows, or try --class-weights balanced",
                  file=sys.stderr)
    return facts


# Fewer training rows than this, and a class is learned poorly if at all: train says so.
FEW_ROWS = 5


def _rare_classes(job: Job) -> list[tuple[str, int]]:
    """(class, training rows) of the classes with at least one but fewer than FEW_ROWS training rows."""
    counts = job.task.label_counts(job.splits["train"].labels, len(job.labels.names))
    return [(name, n) for name, n in zip(job.labels.names, counts) if 0 < n < FEW_ROWS]


def _path(run: RunDir) -> str:
    """What the other ranks get of rank 0's RunDir: its path (they open it without the lock)."""
    return str(run.path)


def resume(run_dir: str, *, allow_pickle: bool = False, progress: bool = True, threads: int | None = None) -> RunDir:
    """Continue an interrupted run from its last complete checkpoint, with its saved config."""
    world = distributed.world()
    run = world.on_main(lambda: _open_for_resume(run_dir), shared=_path)
    run = run if world.is_main else RunDir(Path(run))
    try:
        saved = world.on_main(lambda: checkpoint.load(run.checkpoint))
        config = world.on_main(run.read_config)
        build.use_threads(threads or config.threads)
        job = prepare(config, allow_pickle)
        _say_what_was_read(config, job, world)
        labels = world.on_main(run.read_labels)
        if job.labels.names != labels:
            raise LoraclsError(f"the data's classes {job.labels.names} differ from the run's {labels}; "
                               "resume with the data the run started with")
        job.teachers = teachers_for(config, job, run)  # read back: the teachers are not run again
        if saved.backend != job.backend:
            raise LoraclsError(f"the checkpoint was written by the {saved.backend} backend but this machine picks "
                               f"{job.backend}; set backend: {saved.backend} in {run.file(CONFIG_YAML)}")
        return _fit_recording_status(run, config, job, saved.state, saved, progress)
    finally:
        run.release()


def _open_for_resume(run_dir: str) -> RunDir:
    run = RunDir.open(run_dir, lock_for="train --resume")  # run.info is read under the lock: it stays true
    if run.info.get("status") == "completed":
        run.release()
        raise LoraclsError(f"run {run_dir!r} is already completed; nothing to resume")
    return run


def _fit_recording_status(run: RunDir, config: RunConfig, job: Job, state: TrainState,
                          saved: checkpoint.Checkpoint | None, progress: bool, on_epoch=None) -> RunDir:
    """fit(), with run.json saying 'failed' or 'interrupted' when it does not end normally."""
    try:
        return fit(run, config, job, state, saved, progress, on_epoch)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        if distributed.world().is_main:
            run.mark_ended("interrupted")
        raise
    except BaseException as e:
        if distributed.world().is_main:
            run.mark_ended("failed", error=first_line(e, 200))
        raise


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def fit(run: RunDir, config: RunConfig, job: Job, state: TrainState, saved: checkpoint.Checkpoint | None,
        progress: bool, on_epoch: Callable[[int, dict | None], bool] | None = None) -> RunDir:
    t, model, device, world, task = config.train, job.model, job.device, distributed.world(), job.task
    train_split, val_split = job.training_split(), job.splits.get("validation")
    lengths = [len(x) for x in train_split.token_ids]
    schedule = make_schedule(model, t, device, len(lengths))
    optimizer, scheduler, total_steps = schedule.optimizer, schedule.scheduler, schedule.total_steps
    log_every = log_interval(t, total_steps)
    params = [p for _, p in model.trainable_named_parameters()]
    lora = [p for g in optimizer.param_groups[1:] for p in g["params"]]  # make_optimizer puts the head first
    if saved is not None:
        saved.restore(model, optimizer, scheduler, device, world.rank, world.size)
    forward = world.wrap(model)  # DistributedDataParallel under torchrun
    if world.is_main:
        _announce(run, config, job, lengths, total_steps, saved is not None, state, world.size)

    def all_finite() -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params)

    def save_checkpoint() -> None:
        sums.fold_into(state)
        rng = world.gather(checkpoint.rng_state(device))  # every rank's dropout stream
        if world.is_main:
            if all_finite():  # never checkpoint weights that went non-finite: the previous checkpoint stays
                checkpoint.save(run.checkpoint, state, backend=job.backend, trainable=model.adapter_state_dict(),
                                optimizer=optimizer, scheduler=scheduler, rng=rng)
            run.write_history(state.history)

    def end_interrupted() -> NoReturn:
        """After the checkpoint that a stop request asked for."""
        if world.is_main:
            run.write_info(status="interrupted")
        raise TrainingInterrupted(run.path)

    sums, stop = DeviceSums(device, world, task), StopFlag()
    # Closed however the loop ends (NaN, interrupt, a bug): a sweep trains many runs in one process, and each
    # SummaryWriter holds a thread and an open file.
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(stop)
        # A resumed run replays the steps after its checkpoint: TensorBoard drops what the killed run logged
        # past that point (the checkpoint's own step was logged before it was saved, so it stays).
        log = cleanup.enter_context(contextlib.closing(open_log(
            t.log_to if world.is_main else "none", run.file(TENSORBOARD_DIR),
            purge_step=state.step + 1 if saved is not None else None)))
        shown = cleanup.enter_context(contextlib.closing(Progress(total_steps, state.step, progress, world.is_main)))
        while state.epoch < t.epochs:
            model.train()
            # The order of an epoch depends only on (seed, epoch), so a resumed run replays it exactly.
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + state.epoch)
            batches = model.train_batches(lengths, t.batch_size, gen)
            shown.bar.set_postfix(epoch=state.epoch + 1)
            tick = window_start = time.perf_counter()
            while state.batch < len(batches):
                group = batches[state.batch:state.batch + t.grad_accum]
                n = accumulate(forward, job, group, train_split, t, sums, state, world)
                apply_gradients(optimizer, scheduler, t, params, lora if state.step < schedule.head_steps else ())
                state.batch += len(group)
                state.step += 1
                state.seen += n
                state.window_seen += n
                shown.bar.update(1)

                if state.step % log_every == 0 or state.batch >= len(batches):
                    sums.fold_into(state)
                    r = state.log_step(scheduler.get_last_lr()[0], time.perf_counter() - window_start, len(batches))
                    log.record(r)
                    window_start = time.perf_counter()
                    shown.log_point(r, state.epoch)
                stopping = world.any(stop.signum is not None)  # a signal on any rank stops every rank here
                if stopping or t.save_every_steps and state.step % t.save_every_steps == 0:
                    state.train_seconds += time.perf_counter() - tick
                    tick = time.perf_counter()
                    save_checkpoint()
                    if stopping:
                        end_interrupted()

            # End of epoch: validate, keep the best adapter, checkpoint.
            state.train_seconds += time.perf_counter() - tick
            sums.fold_into(state)
            val = None if val_split is None else task.metrics(
                predict_split(model, task, val_split, t.eval_batch_size, world), val_split.labels, job.labels.names)
            record = state.epoch_record(val, task.running, task.history_keys)
            log.record(record)
            score = val[task.score] if val is not None else state.epoch  # without validation the last epoch is best
            keep_if_best(run if world.is_main else None, config, model, state, score if all_finite() else -math.inf)
            shown.say(_epoch_line(task, record, val, t.epochs))
            state.end_epoch()
            stale = t.early_stopping_patience is not None and state.stale_epochs >= t.early_stopping_patience
            if stale or on_epoch is not None and on_epoch(state.epoch, val):
                why = f": no better validation {task.score} for {plural(state.stale_epochs, 'epoch')}" if stale else ""
                shown.say(f"stopping early after epoch {state.epoch}{why}")
                state.epoch = t.epochs
            save_checkpoint()
            if world.any(stop.signum is not None) and state.epoch < t.epochs:
                end_interrupted()
    # A stop asked for during the last epoch (or while a pruned sweep trial ended) is honoured too: its checkpoint
    # is on disk, `resume` only finishes the run, and a sweep learns that it was asked to stop.
    if world.any(stop.signum is not None):
        end_interrupted()
    finish(run, config, job, state, world)
    return run


class Progress:
    """What the loop shows on stderr (rank 0 alone): a progress bar on a terminal; elsewhere, where a bar's
    redraws would pile up, one line per log point."""

    def __init__(self, total_steps: int, done: int, progress: bool, main: bool):
        from tqdm.auto import tqdm

        live = progress and main and interactive(sys.stderr)
        self.bar = tqdm(total=total_steps, initial=done, unit="step", dynamic_ncols=True, disable=not live,
                        file=sys.stderr)
        self.total, self.main, self.lines = total_steps, main, progress and main and not live

    def say(self, message: str) -> None:
        if self.main:  # tqdm.write ignores `disable`
            self.bar.write(f"loracls: {message}", file=sys.stderr)

    def log_point(self, r: dict, epoch: int) -> None:
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{r['loss']:.4f}", samples_s=r["samples_per_s"])
        if self.lines:
            self.say(f"step {r['step']:,}/{self.total:,} (epoch {r['epoch']:.2f}): loss {r['loss']:.4f}, "
                     f"lr {r['lr']:.3g}, {r['samples_per_s']:,.1f} samples/s")

    def close(self) -> None:
        self.bar.close()


def interactive(stream) -> bool:
    """Whether a progress bar can redraw itself on `stream`: a terminal, or a Jupyter kernel (where tqdm.auto draws
    a widget).  Redirected to a file, a bar's carriage returns pile up (some 30 KB a minute) and nobody sees it."""
    from tqdm import autonotebook, std

    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) or autonotebook.tqdm is not std.tqdm


def apply_gradients(optimizer, scheduler, t: TrainSettings, params: list, dropped: list) -> None:
    """Clip, step, clear.  During a classifier warm-up LoRA's gradients (`dropped`) are discarded first: AdamW then
    skips those tensors (no moments, no weight decay) and clipping sees the head's alone."""
    for p in dropped:
        p.grad = None
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def accumulate(forward, job: Job, group: list[list[int]], split: Split, t: TrainSettings, sums: DeviceSums,
               state: TrainState, world: distributed.World) -> int:
    """Forward and backward over the micro-batches of one optimizer step; returns its number of examples.  The
    gradient is that of the mean loss over the whole group (and, under torchrun, over every rank's share of it:
    DDP averages over ranks, hence the world size in the weight).  Gradients are reduced once per step."""
    model, task = job.model, job.task
    n = sum(len(idx) for idx in group)
    for i, idx in enumerate(group):
        part, counted = world.shard(idx)
        y = task.targets([split.labels[j] for j in part], model.device)
        later = world.distributed and i < len(group) - 1
        with forward.no_sync() if later else contextlib.nullcontext():
            logits = forward(model.collate([split.token_ids[j] for j in part]))
            loss = job.loss_sum(logits, y, part, label_smoothing=t.label_smoothing)
            (loss * (world.size / n if counted else 0.0)).backward()
        sums.add(loss, logits, y, state.step, counted)
        state.tokens += sum(len(split.token_ids[j]) for j in idx)
    return n


def keep_if_best(run: RunDir | None, config: RunConfig, model: Classifier, state: TrainState, score: float) -> None:
    """Write the adapter (run None: not this rank's job) when this epoch's validation score beats every earlier
    one; count stale epochs."""
    if score > state.best_score:
        state.best_score, state.best_epoch, state.stale_epochs = score, state.epoch + 1, 0
        if run is not None:
            saved = peft_format.saved_settings(config.lora)
            peft_format.write_adapter(run.adapter, peft_format.adapter_config(saved, model.layout,
                                                                              base_model=config.model),
                                      model.saved_adapter())
    else:
        state.stale_epochs += 1


def _announce(run: RunDir, config: RunConfig, job: Job, lengths: list[int], total_steps: int, resumed: bool,
              state: TrainState, processes: int) -> None:
    """run.json says the run is running; stderr gets the numbers that catch mistakes early: what trains, on how
    much data (`lengths`: the tokens of each text the loop trains on), for how many steps."""
    run.write_info(status="running", model=config.model, backend=job.backend, device=str(job.device),
                   precision=job.model.precision, processes=processes)
    if resumed:
        print(f"loracls: resuming {run.path} at epoch {state.epoch + 1}, step {state.step}", file=sys.stderr)
    trainable, total = job.trainable_total
    breakdown = ", ".join(f"{k} {v:,}" for k, v in job.plan.breakdown.items()) if job.plan is not None else "n/a"
    t = config.train
    n = {k: len(s.token_ids) for k, s in job.splits.items()}
    unlabelled = f" (+ {n['unlabelled']:,} unlabelled)" if "unlabelled" in n else ""
    print(f"loracls: model {config.model} | {job.backend_note} | device {job.device}\n"
          f"loracls: trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) [{breakdown}]\n"
          f"loracls: {n['train']:,} train{unlabelled} / {n.get('validation', 0):,} validation / "
          f"{n.get('test', 0):,} test "
          f"examples; {sum(lengths):,} train tokens per epoch (mean {sum(lengths) / len(lengths):.1f}); "
          f"{total_steps:,} optimizer steps of {t.batch_size * t.grad_accum}", file=sys.stderr)
    for note in job.plan.notes if job.plan is not None else ():  # e.g. targets inferred for a type with no row
        print(f"loracls: note: {note}", file=sys.stderr)


def _epoch_line(task: Task, record: dict, val: dict | None, epochs: int) -> str:
    running = record[f"train_{task.running}"]
    msg = f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} {task.running_short} {running:.4f}"
    return msg + (f" | validation {task.epoch_summary(val)}" if val is not None else "")
