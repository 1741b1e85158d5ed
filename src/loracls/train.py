"""Training, top to bottom: `train()` starts a run, `resume()` continues one, both call `fit()`.

`fit()` is the loop, in the spirit of nanoGPT's train.py: the schedule, gradient accumulation, clipping, the NaN
guard, logging, validation, best-epoch saving, checkpoints and interrupts are all inline.  Where the loop is lives
in one typed object, `checkpoint.TrainState`, saved whole in every checkpoint.  It talks to the model only
through the backend interface (loracls.backends.base), so it never knows which backend runs.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loracls.atomic import atomic_write_json, atomic_write_text
from loracls import build, checkpoint, peft_format
from loracls import plan as planning
from loracls.backends import Classifier
from loracls.checkpoint import TrainState
from loracls.config import RunConfig, TrainSettings, dump_config
from loracls.data import Labels, Split, load_splits
from loracls.errors import LoraclsError, TrainingInterrupted, first_line
from loracls.evaluate import evaluate_probs, predict_probs
from loracls.rundir import CONFIG_YAML, CONFUSION_PNG, CURVES_PNG, METRICS, REPORT, RunDir, now


# ---------------------------------------------------------------------------------------------------------------
# Setup shared by fresh and resumed runs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """Everything the loop trains on: the data, the model and its checks."""

    splits: dict[str, Split]
    labels: Labels
    plan: planning.Plan | None
    device: torch.device
    backend: str
    model: Classifier
    trainable_total: tuple[int, int]
    """(trainable, total) parameters, counted before merge() drops the LoRA tensors."""
    backend_note: str
    """Which backend runs and, under auto, why."""


def prepare(config: RunConfig, allow_pickle: bool) -> Job:
    """Read and check everything a user can get wrong (model, data, budget) before any file is written."""
    base = build.base_model(config.model, trust_remote_code=config.trust_remote_code)
    build.check_fits(config, base)
    splits, labels = load_splits(config, base.tokenizer, allow_pickle)
    plan = _plan_or_none(base.config, len(labels), config)
    if plan is not None:
        planning.check_budget(plan, config.max_trainable)  # before loading weights: the cheap refusal
    device = build.pick_device(config.device)
    built = build.classifier(base, len(labels), config.lora, backend=config.backend, device=device,
                             seed=config.train.seed, trust_remote_code=config.trust_remote_code)
    model = built.model
    trainable, _ = model.count_parameters()
    if plan is not None and plan.trainable != trainable:
        raise RuntimeError(f"planner counts {plan.trainable} trainable parameters but the model has {trainable}")
    if config.max_trainable is not None and trainable > config.max_trainable:
        raise LoraclsError(f"trainable parameters {trainable:,} exceed --max-trainable {config.max_trainable:,}; "
                           "lower --rank or use fewer --targets (see `loracls plan`)")
    return Job(splits, labels, plan, device, built.backend.name, model, model.count_parameters(), built.note)


def _plan_or_none(model_config, num_labels: int, config: RunConfig) -> planning.Plan | None:
    try:
        return planning.count(model_config, num_labels, config.lora)
    except LoraclsError:
        return None  # an architecture the planner does not know; the model's own count still guards the budget


def make_optimizer(model: Classifier, t: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    params = list(model.trainable_named_parameters())
    b_params = [p for n, p in params if "lora_B" in n]
    other = [p for n, p in params if "lora_B" not in n]
    groups = [{"params": other, "lr": t.lr}]
    if b_params:  # LoRA+ (Hayou et al. 2024): B learns faster than A; ratio 1 is plain LoRA
        groups.append({"params": b_params, "lr": t.lr * t.lora_plus_ratio})
    # fused AdamW is one kernel on CUDA; on the CPU the foreach path is the fast one
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=t.lr, eps=t.adam_eps, weight_decay=t.weight_decay, **extra)


def make_schedule(model: Classifier, t: TrainSettings, device: torch.device, n_examples: int):
    """AdamW and its learning-rate schedule over the whole run; returns (optimizer, scheduler, total steps)."""
    total_steps = math.ceil(math.ceil(n_examples / t.batch_size) / t.grad_accum) * t.epochs
    optimizer = make_optimizer(model, t, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(total_steps, int(t.warmup_ratio * total_steps), t.schedule))
    return optimizer, scheduler, total_steps


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
    """Loss and accuracy sums kept on the device: reading them forces a host sync, so that happens only when
    they are folded into the TrainState (log points and checkpoints).  Also the first step with a non-finite
    loss, found without a sync."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.loss += loss * len(y)
        self.correct += (logits.detach().argmax(-1) == y).sum()
        self.bad_step.copy_(torch.where((self.bad_step < 0) & ~torch.isfinite(loss),
                                        torch.full_like(self.bad_step, step), self.bad_step))

    def fold_into(self, state: TrainState) -> None:
        """Move the sums into `state`; a non-finite loss since the last fold is a LoraclsError."""
        bad = int(self.bad_step)
        if bad >= 0:
            raise LoraclsError(f"the loss became NaN/inf at optimizer step {bad}; the last good checkpoint is kept; "
                               "lower --lr or check the data, then retrain")
        state.add(float(self.loss), int(self.correct))
        self.loss.zero_()
        self.correct.zero_()


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def default_output_dir(config: RunConfig) -> str:
    name = Path(config.model.rstrip("/")).name or "model"
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: RunConfig, *, overwrite: bool = False, allow_pickle: bool = False, progress: bool = True) -> RunDir:
    """Train a fresh run; returns its run directory.  Raises LoraclsError for anything the user can fix."""
    config = config.with_absolute_paths()  # a run must load from any folder, and never become a hub name
    build.use_threads(config.threads)
    job = prepare(config, allow_pickle)
    run = RunDir.create(config.output_dir or default_output_dir(config), overwrite=overwrite)
    try:
        config = config.with_overrides({"output_dir": str(run.path)})
        atomic_write_text(run.file(CONFIG_YAML), dump_config(config))
        run.write_labels(job.labels.names, job.labels.values)
        run.write_info(status="running", model=config.model, started_at=now())
        return _fit_recording_status(run, config, job, TrainState(), None, progress)
    finally:
        run.release()


def resume(run_dir: str, *, allow_pickle: bool = False, progress: bool = True, threads: int | None = None) -> RunDir:
    """Continue an interrupted run from its last complete checkpoint, with its saved config."""
    run = RunDir.open(run_dir, lock_for="train --resume")
    try:
        if run.read_info().get("status") == "completed":
            raise LoraclsError(f"run {run_dir!r} is already completed; nothing to resume")
        saved = checkpoint.load(run.checkpoint)
        config = run.read_config()
        build.use_threads(threads or config.threads)
        job = prepare(config, allow_pickle)
        if job.labels.names != run.read_labels():
            raise LoraclsError(f"the data's classes {job.labels.names} differ from the run's {run.read_labels()}; "
                               "resume with the data the run started with")
        if saved.backend != job.backend:
            raise LoraclsError(f"the checkpoint was written by the {saved.backend} backend but this machine picks "
                               f"{job.backend}; set backend: {saved.backend} in {run.file(CONFIG_YAML)}")
        run.write_info(status="running")
        return _fit_recording_status(run, config, job, saved.state, saved, progress)
    finally:
        run.release()


def _fit_recording_status(run: RunDir, config: RunConfig, job: Job, state: TrainState,
                          saved: checkpoint.Checkpoint | None, progress: bool) -> RunDir:
    """fit(), with run.json saying 'failed' or 'interrupted' when it does not end normally."""
    try:
        return fit(run, config, job, state, saved, progress)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        run.mark_ended("interrupted")
        raise
    except BaseException as e:
        run.mark_ended("failed", error=first_line(e, 200))
        raise


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def fit(run: RunDir, config: RunConfig, job: Job, state: TrainState, saved: checkpoint.Checkpoint | None,
        progress: bool) -> RunDir:
    from tqdm.auto import tqdm

    t, model, device = config.train, job.model, job.device
    run.write_info(backend=job.backend, device=str(device))
    train_split, val_split = job.splits["train"], job.splits.get("validation")
    lengths = [len(x) for x in train_split.token_ids]
    y_all = torch.as_tensor(train_split.labels, dtype=torch.long)
    optimizer, scheduler, total_steps = make_schedule(model, t, device, len(lengths))
    log_every = log_interval(t, total_steps)
    params = [p for _, p in model.trainable_named_parameters()]
    if saved is not None:
        saved.restore(model, optimizer, scheduler, device)
        print(f"loracls: resuming {run.path} at epoch {state.epoch + 1}, step {state.step}", file=sys.stderr)
    _print_header(config, job, total_steps)

    def all_finite() -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params)

    def save_checkpoint() -> None:
        sums.fold_into(state)
        if all_finite():  # never checkpoint weights that went non-finite: the previous checkpoint stays
            checkpoint.save(run.checkpoint, state, backend=job.backend, trainable=model.adapter_state_dict(),
                            optimizer=optimizer, scheduler=scheduler, device=device)
        run.write_history(state.history)

    def stop_and_save() -> None:
        save_checkpoint()
        run.write_info(status="interrupted")
        bar.close()
        raise TrainingInterrupted(run.path)

    sums, stop = DeviceSums(device), StopFlag()
    bar = tqdm(total=total_steps, initial=state.step, unit="step", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    with stop:
        while state.epoch < t.epochs:
            model.train()
            # The order of an epoch depends only on (seed, epoch), so a resumed run replays it exactly.
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + state.epoch)
            batches = model.train_batches(lengths, t.batch_size, gen)
            bar.set_postfix(epoch=state.epoch + 1)
            tick = window_start = time.perf_counter()
            while state.batch < len(batches):
                group = batches[state.batch:state.batch + t.grad_accum]
                n = sum(len(idx) for idx in group)
                for idx in group:
                    y = y_all[idx].to(device, non_blocking=True)
                    logits = model(model.collate([train_split.token_ids[i] for i in idx]))
                    loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
                    (loss * (len(idx) / n)).backward()  # the mean over the whole accumulated group
                    sums.add(loss, logits, y, state.step)
                    state.tokens += sum(lengths[i] for i in idx)
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.batch += len(group)
                state.step += 1
                state.seen += n
                state.window_seen += n
                bar.update(1)

                if state.step % log_every == 0 or state.batch >= len(batches):
                    sums.fold_into(state)
                    r = state.log_step(scheduler.get_last_lr()[0], time.perf_counter() - window_start, len(batches))
                    window_start = time.perf_counter()
                    bar.set_postfix(epoch=state.epoch + 1, loss=f"{r['loss']:.4f}", samples_s=r["samples_per_s"])
                saving = t.save_every_steps and state.step % t.save_every_steps == 0
                if saving or stop.signum is not None:
                    state.train_seconds += time.perf_counter() - tick
                    tick = time.perf_counter()
                    if stop.signum is not None:
                        stop_and_save()
                    save_checkpoint()

            # End of epoch: validate, keep the best adapter, checkpoint.
            state.train_seconds += time.perf_counter() - tick
            sums.fold_into(state)
            val = None if val_split is None else evaluate_probs(
                predict_probs(model, val_split.token_ids, t.eval_batch_size), val_split.labels, job.labels.names)
            record = state.epoch_record(val)
            score = val["accuracy"] if val is not None else state.epoch  # without validation the last epoch is best
            keep_if_best(run, config, model, state, score if all_finite() else -math.inf)
            _print_epoch(bar, record, t.epochs)
            state.end_epoch()
            if t.early_stopping_patience is not None and state.stale_epochs >= t.early_stopping_patience:
                bar.write(f"loracls: early stop: no better validation accuracy for {state.stale_epochs} epochs",
                          file=sys.stderr)
                state.epoch = t.epochs
            save_checkpoint()
            if stop.signum is not None and state.epoch < t.epochs:
                stop_and_save()
    bar.close()
    finish(run, config, job, state)
    return run


def keep_if_best(run: RunDir, config: RunConfig, model: Classifier, state: TrainState, score: float) -> None:
    """Write the adapter when this epoch's validation score beats every earlier one; count stale epochs."""
    if score > state.best_accuracy:
        state.best_accuracy, state.best_epoch, state.stale_epochs = score, state.epoch + 1, 0
        peft_format.write_adapter(run.adapter, peft_format.adapter_config(
            config.lora, model.layout, base_model=config.model), model.adapter_state_dict())
    else:
        state.stale_epochs += 1


def _print_header(config: RunConfig, job: Job, total_steps: int) -> None:
    """The numbers that catch mistakes early: what trains, on how much data, for how many steps."""
    trainable, total = job.trainable_total
    breakdown = ", ".join(f"{k} {v:,}" for k, v in job.plan.breakdown.items()) if job.plan is not None else "n/a"
    lengths = [len(x) for x in job.splits["train"].token_ids]
    t = config.train
    n = {k: len(s.token_ids) for k, s in job.splits.items()}
    print(f"loracls: model {config.model} | {job.backend_note} | device {job.device}\n"
          f"loracls: trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) [{breakdown}]\n"
          f"loracls: {n['train']:,} train / {n.get('validation', 0):,} validation / {n.get('test', 0):,} test "
          f"examples; {sum(lengths):,} train tokens per epoch (mean {sum(lengths) / len(lengths):.1f}); "
          f"{total_steps:,} optimizer steps of {t.batch_size * t.grad_accum}", file=sys.stderr)


def _print_epoch(bar, record: dict, epochs: int) -> None:
    msg = f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
    val = record["validation"]
    if val is not None:
        msg += f" | validation loss {val['loss']:.4f} acc {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}"
    bar.write(f"loracls: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The end of a run
# ---------------------------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finish(run: RunDir, config: RunConfig, job: Job, state: TrainState) -> None:
    """Evaluate the best epoch's adapter (read back from disk, so fresh and resumed runs match), write the metrics,
    the report and the plots, and mark the run completed."""
    import shutil

    from loracls.report import plot_confusion_matrix, plot_training_curves, render_report

    if not run.has_model():
        raise LoraclsError("training produced no finite model to save; lower --lr and retrain")
    model, labels = job.model, job.labels.names
    _, adapter = peft_format.read_adapter(run.adapter)
    model.load_adapter_state_dict(adapter)
    model.merge()
    t0 = time.perf_counter()
    results, n_eval = {}, 0
    for name in ("validation", "test"):
        split = job.splits.get(name)
        results[name] = None if split is None else evaluate_probs(
            predict_probs(model, split.token_ids, config.train.eval_batch_size), split.labels, labels)
        n_eval += 0 if split is None else len(split.token_ids)
    eval_seconds = time.perf_counter() - t0
    best = next((h for h in state.history if h["type"] == "epoch" and h["epoch"] == state.best_epoch), {})
    epochs_run = sum(1 for h in state.history if h["type"] == "epoch")
    metrics = _metrics(config, job, state, results, epochs_run, best, eval_seconds, n_eval)
    atomic_write_json(run.file(METRICS), metrics)
    for name in ("test", "validation"):
        if results[name] is not None:
            plot_confusion_matrix(results[name]["confusion_matrix"], labels, run.file(CONFUSION_PNG),
                                  title=f"{name} confusion matrix ({Path(config.model).name or config.model})")
            break
    plot_training_curves(state.history, run.file(CURVES_PNG))
    atomic_write_text(run.file(REPORT), render_report(metrics, state.history, dump_config(config)))
    run.write_info(status="completed", finished_at=now())
    # The resumable state is useless once the run is complete; the adapter holds the result.
    shutil.rmtree(run.checkpoint.parent, ignore_errors=True)


def _metrics(config: RunConfig, job: Job, state: TrainState, results: dict, epochs_run: int, best: dict,
             eval_seconds: float, n_eval: int) -> dict:
    trainable, total = job.trainable_total
    n = {k: len(s.token_ids) for k, s in job.splits.items()}
    seconds = state.train_seconds
    return {
        "run": {"model": config.model, "backend": job.backend, "device": str(job.device), "status": "completed",
                "best_epoch": state.best_epoch, "epochs_run": epochs_run},
        "parameters": {"trainable": trainable, "total": total, "percent": 100 * trainable / total,
                       "breakdown": job.plan.breakdown if job.plan is not None else {}},
        "train": {"accuracy": best.get("train_accuracy"), "loss": best.get("train_loss")},
        "validation": results["validation"],
        "test": results["test"],
        "timings": {"train_seconds": seconds, "eval_seconds": eval_seconds, "total_seconds": seconds + eval_seconds},
        "throughput": {"train_samples_per_second": n["train"] * epochs_run / max(seconds, 1e-9),
                       "train_tokens_per_second": state.tokens / max(seconds, 1e-9),
                       "eval_samples_per_second": n_eval / max(eval_seconds, 1e-9) if n_eval else None,
                       "peak_memory_mb": peak_memory_mb(job.device)},
        "data": {"train_examples": n["train"], "validation_examples": n.get("validation", 0),
                 "test_examples": n.get("test", 0),
                 "truncated": {k: s.truncated for k, s in job.splits.items()},
                 "skipped_empty": {k: s.examples.skipped_empty for k, s in job.splits.items()},
                 "max_length": config.data.max_length},
        "labels": job.labels.names,
    }
