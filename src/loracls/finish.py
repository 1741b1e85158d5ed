"""The end of a run: the best epoch's model evaluated on validation and test, metrics.json, the plots, report.md,
and the run marked completed."""

from __future__ import annotations

import time

import torch

from loracls import build, distributed, peft_format
from loracls.atomic import atomic_write_json, atomic_write_text
from loracls.backends import Classifier
from loracls.checkpoint import TrainState
from loracls.config import RunConfig, dump_config
from loracls.data import Split, summary
from loracls.errors import LoraclsError
from loracls.torch_inference import predict_outputs
from loracls.job import Job
from loracls.rundir import CURVES_PNG, METRICS, REPORT, RunDir, model_name, now
from loracls.tasks import Task


def predict_split(model: Classifier, task: Task, split: Split, batch_size: int, world: distributed.World):
    """The task's outputs for a whole split: each rank predicts its share, every rank gets all of them."""
    return world.predict(lambda idx: predict_outputs(model, task, [split.token_ids[i] for i in idx], batch_size),
                         len(split.token_ids), model.num_labels)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finish(run: RunDir, config: RunConfig, job: Job, state: TrainState, world: distributed.World) -> None:
    """Evaluate the best epoch's adapter (read back from disk, so fresh and resumed runs match), write the metrics,
    the report and the plots, and mark the run completed.  Under torchrun every rank evaluates its share and rank
    0 writes."""
    import shutil

    from loracls.report import plot_training_curves, render_report

    def best_adapter():
        if not run.has_model():
            raise LoraclsError("training produced no finite model to save; lower --lr and retrain")
        return peft_format.read_adapter(run.adapter)[1]

    model, labels, task = job.model, job.labels.names, job.task
    if peft_format.saved_settings(config.lora) != config.lora:  # PiSSA: the file fits another model shape
        base = build.base_model(config.model, trust_remote_code=config.trust_remote_code)
        model = build.saved_shape(config, base, task.outputs(len(labels)), job.backend, job.device).model
    model.load_adapter_state_dict(world.on_main(best_adapter))
    model.merge()
    t0 = time.perf_counter()
    outputs, n_eval = {}, 0
    for name in ("validation", "test"):
        split = job.splits.get(name)
        if split is not None:
            outputs[name] = predict_split(model, task, split, config.train.eval_batch_size, world)
            n_eval += len(split.token_ids)
    if "validation" in outputs:  # a multi-label run's thresholds; every rank has every output, and tunes alike
        task = task.tuned(outputs["validation"], job.splits["validation"].labels, labels)
    results = {name: task.metrics(outputs[name], job.splits[name].labels, labels) if name in outputs else None
               for name in ("validation", "test")}
    eval_seconds = time.perf_counter() - t0
    if not world.is_main:
        return
    task.save_decisions(run, labels)
    best = next((h for h in state.history if h["type"] == "epoch" and h["epoch"] == state.best_epoch), {})
    epochs_run = sum(1 for h in state.history if h["type"] == "epoch")
    metrics = _metrics(config, job, task, state, results, epochs_run, best, eval_seconds, n_eval)
    if job.teachers is not None:
        metrics["teachers"] = teacher_results(job, task, outputs)
    atomic_write_json(run.file(METRICS), metrics)
    for name in ("test", "validation"):
        if results[name] is not None:
            task.plot(outputs[name], job.splits[name].labels, results[name], labels, run.file(task.figure),
                      title=f"{name} ({model_name(config.model)})")
            break
    plot_training_curves(state.history, run.file(CURVES_PNG), task.score, task.running)
    atomic_write_text(run.file(REPORT), render_report(metrics, state.history, dump_config(config), task))
    run.write_info(status="completed", finished_at=now())
    # The resumable state is useless once the run is complete; the adapter holds the result.
    shutil.rmtree(run.checkpoint.parent, ignore_errors=True)


def teacher_results(job: Job, task: Task, outputs: dict) -> dict:
    """The teachers' own metrics on the student's validation and test splits (their outputs averaged, decided as
    the student decides), and the share of rows where the student answers as they do."""
    t, labels = job.teachers, job.labels.names
    out = {"runs": t.runs, "alpha": t.alpha, "temperature": t.temperature, "warnings": t.warnings}
    for name, student in outputs.items():
        teacher = t.outputs[name]
        out[name] = task.metrics(teacher, job.splits[name].labels, labels)
        out[f"{name}_agreement"] = float(task.agreeing(teacher, student).mean())
    return out


def _metrics(config: RunConfig, job: Job, task: Task, state: TrainState, results: dict, epochs_run: int,
             best: dict, eval_seconds: float, n_eval: int) -> dict:
    trainable, total = job.trainable_total
    n = {k: len(s.token_ids) for k, s in job.splits.items()}
    seconds = state.train_seconds
    return {
        "run": {"model": config.model, "backend": job.backend, "device": str(job.device),
                "precision": job.model.precision, "task": task.name, "method": config.lora.method,
                "status": "completed",
                "best_epoch": state.best_epoch, "epochs_run": epochs_run},
        "parameters": {"trainable": trainable, "total": total, "percent": 100 * trainable / total,
                       "breakdown": job.plan.breakdown if job.plan is not None else {}},
        "train": {task.running: best.get(f"train_{task.running}"), "loss": best.get("train_loss")},
        "validation": results["validation"],
        "test": results["test"],
        "timings": {"train_seconds": seconds, "eval_seconds": eval_seconds, "total_seconds": seconds + eval_seconds},
        "throughput": {"train_samples_per_second": (n["train"] + n.get("unlabelled", 0)) * epochs_run /
                       max(seconds, 1e-9),
                       "train_tokens_per_second": state.tokens / max(seconds, 1e-9),
                       "eval_samples_per_second": n_eval / max(eval_seconds, 1e-9) if n_eval else None,
                       "peak_memory_mb": peak_memory_mb(job.device)},
        "data": {"train_examples": n["train"], "validation_examples": n.get("validation", 0),
                 "test_examples": n.get("test", 0), "unlabelled_examples": n.get("unlabelled", 0),
                 "truncated": {k: s.truncated for k, s in job.splits.items()},
                 "skipped_empty": {k: s.examples.skipped_empty for k, s in job.splits.items()},
                 "max_length": config.data.max_length,
                 "reading": summary(job.splits, job.labels, config.data, task.name)},
        "labels": job.labels.names,
    }
