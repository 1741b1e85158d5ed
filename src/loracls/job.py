"""A training job: everything read and checked before a run writes a file, for fresh and resumed runs alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loracls import build, distributed, planning
from loracls.backends import Classifier
from loracls.config import RunConfig
from loracls.data import Examples, Labels, Split, load_splits
from loracls.errors import LoraclsError
from loracls.tasks import Task, get_task
from loracls.tblog import check_log


@dataclass
class Teachers:
    """What a run learns from besides its labels (--teacher): the teachers' outputs, averaged, for each split of
    the run (loracls.teachers computes them once and stores them in the run)."""

    runs: list[str]
    outputs: dict[str, np.ndarray]
    """Split name -> [N, width] float32: what the teachers' task activation gives (probabilities or values)."""
    on_device: torch.Tensor
    """outputs["train"], then outputs["unlabelled"] where there are unlabelled texts, on the model's device: indexed
    by the row of Job.training_split()."""
    alpha: float
    temperature: float
    source: dict
    """What the outputs were computed from (the teachers' saved models, the student's texts): a stored copy is
    reused only where this is unchanged."""
    warnings: list[str] = field(default_factory=list)
    """Teachers that trained on rows the student holds out (loracls.teachers.learned_held_out), one line each."""


@dataclass
class Job:
    """Everything the loop trains on: the data, the model and its checks."""

    splits: dict[str, Split]
    labels: Labels
    task: Task
    plan: planning.Plan | None
    device: torch.device
    backend: str
    model: Classifier
    trainable_total: tuple[int, int]
    """(trainable, total) parameters, counted before merge() drops the LoRA tensors."""
    backend_note: str
    """Which backend runs and, under auto, why."""
    class_weights: torch.Tensor | None = None
    """One loss weight per class on the model's device (--class-weights), or None."""
    teachers: Teachers | None = None
    """The teachers' outputs to distill (--teacher), or None."""

    def training_split(self) -> Split:
        """What the loop trains on: the training split, then any unlabelled texts (data.unlabelled) labelled as
        their teachers answer (for the running training metric alone: loss_sum gives them no task loss)."""
        train, extra = self.splits["train"], self.splits.get("unlabelled")
        if extra is None:
            return train
        ex, more = train.examples, extra.examples
        labels = self.task.labels_of(self.teachers.outputs["unlabelled"])
        examples = Examples(texts=ex.texts + more.texts, labels=ex.labels + labels, rows=ex.rows + more.rows,
                            ids=None, source=ex.source, skipped_empty=ex.skipped_empty, reading=ex.reading)
        return Split(examples, train.token_ids + extra.token_ids, train.truncated + extra.truncated)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor, rows: list[int],
                 label_smoothing: float = 0.0) -> torch.Tensor:
        """The training loss of a micro-batch, summed over its rows (`rows`: their indices in training_split()):
        the task's loss, and with teachers (1 - alpha) of it plus alpha of the distillation loss.  An unlabelled
        text has the distillation loss alone (weight 1): its teachers' outputs are all it has to learn from."""
        t = self.teachers
        if t is None:
            return self.task.loss_sum(logits, targets, label_smoothing=label_smoothing, weights=self.class_weights)
        teacher = t.on_device[torch.as_tensor(rows, device=t.on_device.device)]
        labelled = len(self.splits["train"].token_ids)
        if max(rows) < labelled:
            return self._distilled(logits, targets, teacher, label_smoothing)
        has_label = torch.as_tensor([r < labelled for r in rows], device=logits.device)
        return (self._distilled(logits[has_label], targets[has_label], teacher[has_label], label_smoothing) +
                self.task.distill_loss_sum(logits[~has_label], teacher[~has_label], t.temperature))

    def _distilled(self, logits, targets, teacher, label_smoothing: float) -> torch.Tensor:
        t = self.teachers
        loss = self.task.loss_sum(logits, targets, label_smoothing=label_smoothing, weights=self.class_weights)
        return (1 - t.alpha) * loss + t.alpha * self.task.distill_loss_sum(logits, teacher, t.temperature)


def prepare(config: RunConfig, allow_pickle: bool) -> Job:
    """Read and check everything a user can get wrong (batch split, logger, model, data, budget) before any file
    is written."""
    distributed.world().check_batch(config.train.batch_size)
    check_log(config.train.log_to)
    base = build.base_model(config.model, trust_remote_code=config.trust_remote_code)
    build.check_fits(config, base)
    splits, labels = load_splits(config, base.tokenizer, allow_pickle)
    task = get_task(splits["train"].examples.reading["task"])  # as the data or --task decided
    outputs = task.outputs(len(labels))
    plan = _plan_or_none(base.config, outputs, config)
    if plan is not None:
        planning.check_budget(plan, config.max_trainable)  # before loading weights: the cheap refusal
    device = build.pick_device(distributed.world().device(config.device))
    built = build.classifier(base, outputs, config.lora, backend=config.backend, device=device,
                             seed=config.train.seed, precision=config.precision,
                             trust_remote_code=config.trust_remote_code)
    model = built.model
    trainable, total = model.count_parameters()
    if plan is not None and plan.trainable != trainable:
        raise RuntimeError(f"planner counts {plan.trainable} trainable parameters but the model has {trainable}")
    if config.max_trainable is not None and trainable > config.max_trainable:
        raise LoraclsError(f"trainable parameters {trainable:,} exceed --max-trainable {config.max_trainable:,}; "
                           "lower --rank or use fewer --targets (see `loracls plan`)")
    weights = class_weights(config.train.class_weights, splits["train"].labels, labels.names, task)
    return Job(splits, labels, task, plan, device, built.backend.name, model, (trainable, total), built.note,
               None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device))


def class_weights(spec: str | None, train_labels: list, names: list[str], task: Task) -> list[float] | None:
    """The loss weight of each class: `balanced` is the task's (single-label: n / (K * n_k) over the training split,
    scikit-learn's compute_class_weight; multi-label: each label's negatives over its positives, as
    BCEWithLogitsLoss's pos_weight), a JSON file gives {class name: weight}."""
    if spec is None:
        return None
    if not task.has_classes:
        raise LoraclsError(f"--class-weights applies to classes, and a {task.name} run has none; drop it")
    if spec == "balanced":
        return task.balanced_weights(train_labels, len(names))
    return _weights_file(spec, names)


def _weights_file(path: str, names: list[str]) -> list[float]:
    import json
    import math
    from pathlib import Path

    try:
        given = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError:
        raise LoraclsError(f"--class-weights {path!r} is neither 'balanced' nor a readable JSON file; pass "
                           "balanced or a file such as weights.json") from None
    except ValueError as e:
        raise LoraclsError(f"--class-weights file {path!r} is not JSON ({e}); write {{\"class name\": weight, ...}}") \
            from None
    if not isinstance(given, dict):
        raise LoraclsError(f"--class-weights file {path!r} must hold one object {{\"class name\": weight, ...}}")
    missing, unknown = [n for n in names if n not in given], [k for k in given if k not in names]
    if missing or unknown:
        what = f"lacks class {missing[0]!r}" if missing else f"names {unknown[0]!r}, which is not a class"
        raise LoraclsError(f"--class-weights file {path!r} {what}; the run's classes are {', '.join(names)}")
    bad = [k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or
           not math.isfinite(v) or v < 0]
    if bad:
        raise LoraclsError(f"--class-weights file {path!r}: the weight of {bad[0]!r} must be a number >= 0")
    return [float(given[n]) for n in names]


def _plan_or_none(model_config, num_labels: int, config: RunConfig) -> planning.Plan | None:
    try:
        return planning.count(model_config, num_labels, config.lora)
    except LoraclsError:
        return None  # an architecture the planner does not know; the model's own count still guards the budget
