"""Training, top to bottom: `train()` starts a run, `resume()` continues one, and both call `_fit()`.

`_fit()` is the whole loop in one function, in the spirit of nanoGPT's train.py: schedule, clipping, gradient
accumulation, NaN guard, validation, best-epoch saving, checkpointing and interrupts are all inline.  It talks to
the model only through the backend interface (loracls.backends.base), so it never knows which backend runs.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loracls import peft_format, plan as planning
from loracls.backends import Classifier, select_backend
from loracls.config import RunConfig, dump_config
from loracls.data import Examples, read_examples, split_validation
from loracls.errors import LoraclsError, first_line
from loracls.evaluate import evaluate_probs, pick_device, predict_probs
from loracls.models import load_tokenizer, max_positions, resolve_model_dir, tokenize
from loracls.rundir import (CONFIG_YAML, CONFUSION_PNG, CURVES_PNG, LABELS_JSON, METRICS, REPORT, RunDir,
                            atomic_write_json, atomic_write_text)

CHECKPOINT_VERSION = 1


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the checkpoint is safely written.  The CLI exits 130."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted; resume with: loracls train --resume {run_dir}")
        self.run_dir = run_dir


# ---------------------------------------------------------------------------------------------------------------
# Data: read, split, tokenize
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    examples: Examples
    token_ids: list[list[int]]
    truncated: int

    @property
    def labels(self) -> list[int]:
        return self.examples.labels


def load_splits(config: RunConfig, tokenizer, allow_pickle: bool) -> tuple[dict[str, Split], list[str]]:
    """train / validation / test splits, tokenized, and the class names."""
    d = config.data
    if not d.train:
        raise LoraclsError("no training data; pass --train FILE (or a hub dataset name such as fancyzhx/ag_news)")
    kw = dict(text_columns=d.text_columns, label_column=d.label_column, allow_pickle=allow_pickle)
    train, names = read_examples(d.train, default_split="train", **kw)
    if d.max_train_samples is not None and len(train) > d.max_train_samples:
        train = train.subset(list(range(d.max_train_samples)))
    if d.validation:
        val, _ = read_examples(d.validation, label_names=names, default_split="validation", **kw)
    elif d.validation_fraction > 0:
        train, val = split_validation(train, d.validation_fraction, config.train.seed)
    else:
        val = None
    test = read_examples(d.test, label_names=names, default_split="test", **kw)[0] if d.test else None
    splits = {}
    for name, ex in (("train", train), ("validation", val), ("test", test)):
        if ex is None:
            continue
        if name != "train" and d.max_eval_samples is not None and len(ex) > d.max_eval_samples:
            ex = ex.subset(list(range(d.max_eval_samples)))
        if len(ex) == 0:
            raise LoraclsError(f"the {name} split is empty; give it more rows")
        ids, truncated = tokenize(tokenizer, ex.texts, d.max_length)
        splits[name] = Split(ex, ids, truncated)
    return splits, names


# ---------------------------------------------------------------------------------------------------------------
# Model setup shared by fresh and resumed runs
# ---------------------------------------------------------------------------------------------------------------
def _check_model_fits(config: RunConfig, model_config) -> None:
    limit = max_positions(model_config)
    if config.data.max_length > limit:
        raise LoraclsError(f"max length {config.data.max_length} exceeds the model's {limit} positions; "
                           f"pass --max-length {limit} or less")
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    if hidden and config.lora.rank > hidden:
        raise LoraclsError(f"rank {config.lora.rank} exceeds the model's hidden size {hidden}; pass a smaller --rank")
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    if config.lora.layers and layers and max(config.lora.layers) >= layers:
        raise LoraclsError(f"lora.layers names layer {max(config.lora.layers)} but the model has {layers} "
                           f"(0..{layers - 1}); fix the layer list")


def _plan_or_none(model_config, num_labels, config: RunConfig):
    try:
        return planning.count(model_config, num_labels, config.lora)
    except LoraclsError:
        return None  # an architecture the planner does not know; the model's own count still guards the budget


def _build(config: RunConfig, model_dir: str, model_config, num_labels: int,
           device: torch.device) -> tuple[str, Classifier]:
    """The backend's name and a fresh model, its head and LoRA A drawn from the seed."""
    backend = select_backend(config.backend, model_config, config.lora)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    return backend.name, backend.build(model_dir, num_labels, config.lora, device, seed=config.train.seed,
                                       trust_remote_code=config.trust_remote_code)


def _check_trainable(model: Classifier, plan, budget: int | None) -> None:
    trainable, _ = model.count_parameters()
    if plan is not None and plan.trainable != trainable:
        raise RuntimeError(f"planner counts {plan.trainable} trainable parameters but the model has {trainable}")
    if budget is not None and trainable > budget:
        raise LoraclsError(f"trainable parameters {trainable:,} exceed --max-trainable {budget:,}; "
                           "lower --rank or use fewer --targets (see `loracls plan`)")


def _optimizer(model: Classifier, config: RunConfig, device: torch.device) -> torch.optim.AdamW:
    t = config.train
    params = list(model.trainable_named_parameters())
    b_params = [p for n, p in params if "lora_B" in n]
    other = [p for n, p in params if "lora_B" not in n]
    groups = [{"params": other, "lr": t.lr}]
    if b_params:  # LoRA+ (Hayou et al. 2024): B learns faster than A; ratio 1 is plain LoRA
        groups.append({"params": b_params, "lr": t.lr * t.lora_plus_ratio})
    # fused AdamW is one kernel on CUDA; on the CPU the foreach path is the fast one
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=t.lr, eps=t.adam_eps, weight_decay=t.weight_decay, **extra)


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
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


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class _StopFlag:
    """Ctrl-C and SIGTERM set a flag that the loop reads at the next optimizer step; a second Ctrl-C aborts."""

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


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    """What a fresh and a resumed run both need before the loop: data, the model and its checks."""

    splits: dict[str, Split]
    labels: list[str]
    plan: object
    device: torch.device
    backend: str
    model: Classifier


def _prepare(config: RunConfig, allow_pickle: bool) -> _Prepared:
    model_dir = resolve_model_dir(config.model)
    model_config = planning.read_model_config(model_dir, trust_remote_code=config.trust_remote_code)
    _check_model_fits(config, model_config)
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    splits, labels = load_splits(config, tokenizer, allow_pickle)
    plan = _plan_or_none(model_config, len(labels), config)
    if plan is not None:
        planning.check_budget(plan, config.max_trainable)  # before loading weights: the cheap refusal
    device = pick_device(config.device)
    backend, model = _build(config, model_dir, model_config, len(labels), device)
    _check_trainable(model, plan, config.max_trainable)
    return _Prepared(splits, labels, plan, device, backend, model)


def default_output_dir(config: RunConfig) -> str:
    name = Path(config.model.rstrip("/")).name or "model"
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: RunConfig, *, overwrite: bool = False, allow_pickle: bool = False, progress: bool = True) -> RunDir:
    """Train a fresh run; returns its run directory.  Raises LoraclsError for anything the user can fix."""
    # Everything that can fail on user input is checked before the run directory is created.
    p = _prepare(config, allow_pickle)

    output_dir = config.output_dir or default_output_dir(config)
    run = RunDir.create(output_dir, overwrite=overwrite)
    config = config.with_overrides({"output_dir": str(run.path)})
    atomic_write_text(run.file(CONFIG_YAML), dump_config(config))
    atomic_write_json(run.file(LABELS_JSON), p.labels)
    run.write_info(status="running", model=config.model, started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return _fit_recording_status(run, config, p.backend, p.model, p.device, p.splits, p.labels, p.plan, None,
                                 progress)


def resume(run_dir: str, *, allow_pickle: bool = False, progress: bool = True) -> RunDir:
    """Continue an interrupted run from its last complete checkpoint, with its saved config."""
    run = RunDir.open(run_dir)
    info = run.read_info()
    if info.get("status") == "completed":
        raise LoraclsError(f"run {run_dir!r} is already completed; nothing to resume")
    if not run.checkpoint.is_file():
        raise LoraclsError(f"run {run_dir!r} has no checkpoint yet (it stopped before the first save); "
                           "start it again with --overwrite")
    try:
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraclsError(f"checkpoint {run.checkpoint} is corrupt ({first_line(e)}); "
                           "start the run again with --overwrite") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise LoraclsError(f"checkpoint {run.checkpoint} was written by an incompatible loracls; retrain the run")
    config = run.read_config()
    p = _prepare(config, allow_pickle)
    if p.labels != run.read_labels():
        raise LoraclsError(f"the data's classes {p.labels} differ from the run's {run.read_labels()}; "
                           "resume with the data the run started with")
    if state.get("backend") != p.backend:
        raise LoraclsError(f"the checkpoint was written by the {state.get('backend')} backend but this machine "
                           f"picks {p.backend}; set backend: {state.get('backend')} in {run.file(CONFIG_YAML)}")
    run.write_info(status="running")
    return _fit_recording_status(run, config, p.backend, p.model, p.device, p.splits, p.labels, p.plan, state,
                                 progress)


def _fit_recording_status(run: RunDir, *args) -> RunDir:
    """_fit, with run.json saying 'failed' or 'interrupted' when it does not end normally."""
    try:
        return _fit(run, *args)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        run.write_info(status="interrupted")
        raise
    except BaseException as e:
        if run.read_info().get("status") == "running":
            run.write_info(status="failed", error=first_line(e, 200))
        raise


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def _fit(run: RunDir, config: RunConfig, backend: str, model: Classifier, device: torch.device,
         splits: dict[str, Split], labels: list[str], plan, state: dict | None, progress: bool) -> RunDir:
    from tqdm.auto import tqdm

    t = config.train
    run.write_info(backend=backend, device=str(device))
    trainable, total = model.count_parameters()

    train_split, val_split, test_split = splits["train"], splits.get("validation"), splits.get("test")
    train_ids, lengths = train_split.token_ids, [len(x) for x in train_split.token_ids]
    y_all = torch.as_tensor(train_split.labels, dtype=torch.long)
    micro_per_epoch = math.ceil(len(train_ids) / t.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
    total_steps = steps_per_epoch * t.epochs
    optimizer = _optimizer(model, config, device)
    trainable_params = [p for _, p in model.trainable_named_parameters()]

    def all_finite() -> bool:
        return all(bool(torch.isfinite(p).all()) for p in trainable_params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, int(t.warmup_ratio * total_steps), t.schedule))

    # Where we are.  A fresh run starts at zero; a resumed one takes everything from the checkpoint.
    pos = {"epoch": 0, "batch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": -1, "stale_epochs": 0,
           "loss_sum": 0.0, "correct": 0, "seen": 0, "train_seconds": 0.0, "tokens": 0}
    history: list[dict] = []
    if state is not None:
        model.load_adapter_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
        pos.update(state["position"])
        history = list(state["history"])
        print(f"loracls: resuming {run.path} at epoch {pos['epoch'] + 1}, step {pos['step']}", file=sys.stderr)

    breakdown = ", ".join(f"{k} {v:,}" for k, v in plan.lora_by_target.items()) + f", head {plan.head:,}" \
        if plan is not None else "n/a"
    print(f"loracls: model {config.model} | backend {backend} | device {device}\n"
          f"loracls: trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) [{breakdown}]\n"
          f"loracls: {len(train_ids):,} train / {len(val_split.token_ids) if val_split else 0:,} validation / "
          f"{len(test_split.token_ids) if test_split else 0:,} test examples; {sum(lengths):,} train tokens per "
          f"epoch (mean {sum(lengths) / len(lengths):.1f}); {total_steps:,} optimizer steps of {t.batch_size * t.grad_accum}",
          file=sys.stderr)

    def save_checkpoint():
        # Never checkpoint weights that already went non-finite: the previous checkpoint stays the good one.
        if not all_finite():
            return
        payload = {"version": CHECKPOINT_VERSION, "backend": backend,
                   "trainable": model.adapter_state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "rng": _rng_state(device), "position": dict(pos),
                   "history": history}
        import io

        buf = io.BytesIO()
        torch.save(payload, buf)
        from loracls.rundir import atomic_write_bytes

        run.checkpoint.parent.mkdir(exist_ok=True)
        atomic_write_bytes(run.checkpoint, buf.getvalue())

    def validate() -> dict | None:
        if val_split is None:
            return None
        probs = predict_probs(model, val_split.token_ids, t.eval_batch_size)
        return evaluate_probs(probs, val_split.labels, labels)

    # On-device accumulators: reading them forces a host sync, so that happens only at log points.
    loss_acc = torch.zeros((), device=device)
    correct_acc = torch.zeros((), dtype=torch.long, device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first optimizer step with a non-finite loss

    def check_finite():
        s = int(bad_step)
        if s >= 0:
            lr = scheduler.get_last_lr()[0]
            run.write_info(status="failed", error=f"non-finite loss at step {s}")
            raise LoraclsError(f"the loss became NaN/inf at optimizer step {s} (lr {lr:.3g}); the last good "
                               f"checkpoint is kept; lower --lr or check the data, then retrain")

    stop = _StopFlag()
    bar = tqdm(total=total_steps, initial=pos["step"], unit="step", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    with stop:
        while pos["epoch"] < t.epochs:
            epoch = pos["epoch"]
            model.train()
            # The order of an epoch depends only on (seed, epoch), so a resumed run replays it exactly.
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
            batches = model.train_batches(lengths, t.batch_size, gen)
            t0, samples_since, window_start = time.perf_counter(), 0, time.perf_counter()
            b = pos["batch"]
            while b < len(batches):
                group = batches[b:b + t.grad_accum]
                group_size = sum(len(idx) for idx in group)
                for idx in group:
                    y = y_all[idx].to(device, non_blocking=True)
                    logits = model(model.collate([train_ids[i] for i in idx]))
                    loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
                    (loss * (len(idx) / group_size)).backward()
                    loss_acc += loss.detach() * len(idx)
                    correct_acc += (logits.detach().argmax(-1) == y).sum()
                    pos["tokens"] += sum(lengths[i] for i in idx)
                    bad_step.copy_(torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                               torch.full_like(bad_step, pos["step"]), bad_step))
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable_params, t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                b += len(group)
                pos["step"] += 1
                pos["batch"] = b
                pos["seen"] += group_size
                samples_since += group_size
                bar.update(1)

                if pos["step"] % t.log_every == 0 or b >= len(batches):
                    check_finite()
                    now = time.perf_counter()
                    pos["loss_sum"] += float(loss_acc)
                    pos["correct"] += int(correct_acc)
                    loss_acc.zero_()
                    correct_acc.zero_()
                    rate = samples_since / max(now - window_start, 1e-9)
                    samples_since, window_start = 0, now
                    record = {"type": "step", "step": pos["step"], "epoch": round(epoch + b / len(batches), 4),
                              "loss": pos["loss_sum"] / max(pos["seen"], 1), "lr": scheduler.get_last_lr()[0],
                              "samples_per_s": round(rate, 2)}
                    history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{rate:.0f}", epoch=epoch + 1)
                if t.save_every_steps and pos["step"] % t.save_every_steps == 0:
                    check_finite()
                    pos["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_checkpoint()
                    run.write_history(history)
                if stop.signum is not None:
                    check_finite()
                    pos["train_seconds"] += time.perf_counter() - t0
                    save_checkpoint()
                    run.write_history(history)
                    run.write_info(status="interrupted")
                    bar.close()
                    raise TrainingInterrupted(run.path)

            # End of epoch: validate, keep the best adapter, checkpoint.
            pos["train_seconds"] += time.perf_counter() - t0
            check_finite()
            val = validate()
            record = {"type": "epoch", "epoch": epoch + 1, "train_loss": pos["loss_sum"] / max(pos["seen"], 1),
                      "train_accuracy": pos["correct"] / max(pos["seen"], 1),
                      "validation": None if val is None else
                      {"accuracy": val["accuracy"], "macro_f1": val["macro_f1"], "loss": val["loss"]}}
            history.append(record)
            score = val["accuracy"] if val is not None else epoch  # without validation the last epoch is best
            if all_finite() and score > pos["best_accuracy"]:
                pos["best_accuracy"], pos["best_epoch"], pos["stale_epochs"] = score, epoch + 1, 0
                adapter_config = peft_format.adapter_config(config.lora, base_model=config.model,
                                                            model_type=model.model_type)
                peft_format.write_adapter(run.adapter, adapter_config, model.adapter_state_dict())
            else:
                pos["stale_epochs"] += 1
            msg = f"epoch {epoch + 1}/{t.epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
            if val is not None:
                msg += f" | validation loss {val['loss']:.4f} acc {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}"
            bar.write(f"loracls: {msg}", file=sys.stderr)
            pos.update(epoch=epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0)
            early = t.early_stopping_patience is not None and pos["stale_epochs"] >= t.early_stopping_patience
            if early:
                bar.write(f"loracls: early stop: no better validation accuracy for {pos['stale_epochs']} epochs",
                          file=sys.stderr)
                pos["epoch"] = t.epochs
            save_checkpoint()
            run.write_history(history)
            if stop.signum is not None and pos["epoch"] < t.epochs:
                run.write_info(status="interrupted")
                bar.close()
                raise TrainingInterrupted(run.path)
    bar.close()

    _finish(run, config, backend, model, splits, labels, history, pos, trainable, total, plan, device)
    return run


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _finish(run: RunDir, config: RunConfig, backend: str, model: Classifier, splits: dict[str, Split], labels: list[str],
            history: list[dict], pos: dict, trainable: int, total: int, plan, device: torch.device) -> None:
    """Evaluate the best epoch's adapter (read back from disk, so fresh and resumed runs match), write the metrics,
    the report and the plots, and mark the run completed."""
    from loracls.report import plot_confusion_matrix, plot_training_curves, render_report

    t = config.train
    if not run.has_model():
        raise LoraclsError("training produced no finite model to save; lower --lr and retrain")
    _, state = peft_format.read_adapter(run.adapter)
    model.load_adapter_state_dict(state)
    model.merge()
    t0 = time.perf_counter()
    results, n_eval = {}, 0
    for name in ("validation", "test"):
        split = splits.get(name)
        if split is None:
            results[name] = None
            continue
        probs = predict_probs(model, split.token_ids, t.eval_batch_size)
        results[name] = evaluate_probs(probs, split.labels, labels)
        n_eval += len(split.token_ids)
    eval_seconds = time.perf_counter() - t0
    best = next((h for h in history if h["type"] == "epoch" and h["epoch"] == pos["best_epoch"]), {})
    epochs_run = sum(1 for h in history if h["type"] == "epoch")
    train_seconds = pos["train_seconds"]
    n_train = len(splits["train"].token_ids)
    metrics = {
        "run": {"model": config.model, "backend": backend, "device": str(device), "status": "completed",
                "best_epoch": pos["best_epoch"], "epochs_run": epochs_run},
        "parameters": {"trainable": trainable, "total": total, "percent": 100 * trainable / total,
                       "breakdown": ({**plan.lora_by_target, "head": plan.head} if plan is not None else {})},
        "train": {"accuracy": best.get("train_accuracy"), "loss": best.get("train_loss")},
        "validation": results["validation"],
        "test": results["test"],
        "timings": {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
                    "total_seconds": train_seconds + eval_seconds},
        "throughput": {"train_samples_per_second": n_train * epochs_run / max(train_seconds, 1e-9),
                       "train_tokens_per_second": pos["tokens"] / max(train_seconds, 1e-9),
                       "eval_samples_per_second": n_eval / max(eval_seconds, 1e-9) if n_eval else None,
                       "peak_memory_mb": _peak_memory_mb(device)},
        "data": {"train_examples": n_train,
                 "validation_examples": len(splits["validation"].token_ids) if "validation" in splits else 0,
                 "test_examples": len(splits["test"].token_ids) if "test" in splits else 0,
                 "truncated": {k: s.truncated for k, s in splits.items()},
                 "skipped_empty": {k: s.examples.skipped_empty for k, s in splits.items()},
                 "max_length": config.data.max_length},
        "labels": labels,
    }
    atomic_write_json(run.file(METRICS), metrics)
    for name in ("test", "validation"):
        if results[name] is not None:
            plot_confusion_matrix(results[name]["confusion_matrix"], labels, run.file(CONFUSION_PNG),
                                  title=f"{name} confusion matrix ({config.model})")
            break
    plot_training_curves(history, run.file(CURVES_PNG))
    atomic_write_text(run.file(REPORT), render_report(metrics, history, dump_config(config)))
    run.write_info(status="completed", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    # The resumable state is useless once the run is complete; the adapter holds the result.
    import shutil

    shutil.rmtree(run.checkpoint.parent, ignore_errors=True)
