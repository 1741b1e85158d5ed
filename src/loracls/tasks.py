"""What a task is: everything that depends on the shape of the answer, written once per task.

A task turns a run's labels into training targets, scores logits against them (the loss), turns logits into
outputs (the activation), measures outputs against labels (the metrics), names the metric that picks the best
epoch and ranks sweep trials, formats a prediction row, writes its sections of report.md, and names the
`problem_type` an exported transformers model declares.  The training loop, the checkpoint, the predictors, the
report, the sweep, the export and the planner ask the run's task and never assume one.

| task           | outputs | loss                 | activation | best epoch / sweep | problem_type                |
|----------------|---------|----------------------|------------|--------------------|-----------------------------|
| `single-label` | K       | cross-entropy        | softmax    | accuracy           | single_label_classification |
| `multi-label`  | K       | binary cross-entropy | sigmoid    | micro F1           | multi_label_classification  |
| `regression`   | 1       | mean squared error   | none       | Spearman           | regression                  |

A multi-label run also decides with a threshold per label, tuned on validation at the end of training and stored
in the run (`thresholds.json`): `tuned` returns the task holding them, `for_run` reads them back.

Torch is imported inside the methods that need it (loss, hits, activation on tensors): ONNX serving asks the task
for outputs and rows without torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from loracls.errors import LoraclsError
from loracls.metrics import evaluate_probs
from loracls.rundir import CONFUSION_PNG, PER_LABEL_PNG, SCATTER_PNG, THRESHOLDS_JSON


# Where a caller's labels are named in a refusal (Task.read_gold).
_GOLD = dict(loc=lambda i: f"labels[{i}]", src="evaluate()", column="labels")


class Task:
    """The facts and functions of one task shape.  Subclasses fill them in; an instance holds at most the
    decision rule fitted at the end of training (multi-label thresholds)."""

    name: str
    """How configs, run.json and the CLI spell the task."""
    problem_type: str
    """transformers' `config.problem_type` for an exported model."""
    score: str
    """The metric (a key of `metrics()`) that picks the best epoch and is a sweep's default objective; higher is
    better."""
    running: str
    """The training metric accumulated on the device during an epoch, in the history as `train_<running>`."""
    running_short: str
    """Its name in the per-epoch log line."""
    has_classes: bool
    """Whether the labels are classes (class weights, per-class counts and warnings apply)."""
    history_keys: tuple[str, ...]
    """The validation metrics each epoch's history record keeps (the score among them)."""
    figure: str
    """The file name of the run's results figure (see `plot`)."""
    metric_names: tuple[str, ...]
    """The single-number metrics `metrics()` reports: what a sweep may be chosen on (--metric)."""

    def outputs(self, num_labels: int) -> int:
        """Width of the head (and of the logits) for `num_labels` labels."""
        raise NotImplementedError

    def label_counts(self, labels: Sequence[Any], num_labels: int) -> list[int]:
        """Rows per class (tasks with classes)."""
        raise NotImplementedError

    def balanced_weights(self, labels: Sequence[Any], num_labels: int) -> list[float]:
        """The loss weights of --class-weights balanced, from the training labels (tasks with classes)."""
        raise NotImplementedError

    # -- the decision rule fitted after training (multi-label thresholds); nothing to fit for the others ------------
    def tuned(self, outputs: np.ndarray, labels: Sequence[Any], names: Sequence[str]) -> "Task":
        """This task with its decision rule fitted on validation outputs and labels."""
        return self

    def save_decisions(self, run, names: Sequence[str]) -> None:
        """Write the fitted decision rule into the run directory (a loracls.rundir.RunDir)."""

    def for_run(self, run, names: Sequence[str]) -> "Task":
        """This task with the decision rule a finished run stored."""
        return self

    # -- training (torch) ---------------------------------------------------------------------------------------
    def targets(self, labels: Sequence[Any], device) -> Any:
        """The training targets of a batch's labels, as a tensor on `device`."""
        raise NotImplementedError

    def read_gold(self, raw: Sequence[Any], labels, data) -> list:
        """Labels given by a caller (the Python API's evaluate) as this task holds them: class ids, 0/1 rows or
        numbers.  `labels`: the run's loracls.data.Labels; `data`: its DataSettings (label case, separator)."""
        raise NotImplementedError

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        """The loss summed over the batch (the loop divides by the step's example count).  `weights`: one per
        class (--class-weights), where the task takes them."""
        raise NotImplementedError

    def distill_loss_sum(self, logits, teacher, temperature: float):
        """The distillation loss summed over the batch (averaged over labels, like `loss_sum`): how far the
        logits are from the teachers' outputs `teacher` (what `activate` gives: probabilities or values), both
        softened by `temperature`, times its square (Hinton et al. 2015) so that gradients keep their scale."""
        raise NotImplementedError

    def hits(self, logits, targets):
        """The running training metric summed over the batch, as a tensor (no host sync)."""
        raise NotImplementedError

    def labels_of(self, outputs: np.ndarray) -> list:
        """The labels outputs [N, outputs] answer, one per row as the data holds labels (a class id, a 0/1 tuple or
        a number): what an unlabelled text's teachers say, for the running training metric."""
        raise NotImplementedError

    def activate(self, logits):
        """Outputs from logits on torch tensors, [N, outputs]."""
        raise NotImplementedError

    # -- outputs (numpy, no torch) ------------------------------------------------------------------------------
    def activate_np(self, logits: np.ndarray) -> np.ndarray:
        """The same activation on numpy logits (ONNX serving)."""
        raise NotImplementedError

    def metrics(self, outputs: np.ndarray, labels: Sequence[Any], names: Sequence[str]) -> dict:
        """Metrics of outputs [N, outputs] against the labels, JSON-ready; includes `score` and "loss"."""
        raise NotImplementedError

    def agreeing(self, reference: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Per row, whether `other` outputs answer as the `reference` ones do (int8 against fp32)."""
        raise NotImplementedError

    def epoch_summary(self, m: dict) -> str:
        """A split's metrics in the per-epoch log line."""
        raise NotImplementedError

    def summary(self, m: dict) -> str:
        """A split's headline metrics, as `loracls train` and `loracls evaluate` print them."""
        raise NotImplementedError

    def console_lines(self, m: dict, names: Sequence[str]) -> list[str]:
        """What `loracls evaluate` prints for a split's metrics."""
        raise NotImplementedError

    def records(self, outputs: np.ndarray, names: Sequence[str]) -> list[dict]:
        """One prediction record per row (what a JSONL line holds besides its id, and what the API returns)."""
        raise NotImplementedError

    def csv_header(self, names: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def csv_cells(self, record: dict, names: Sequence[str]) -> list:
        raise NotImplementedError

    def kaggle_value(self, record: dict):
        """The `Label` cell of a Kaggle-style submission."""
        raise NotImplementedError

    # -- the report ---------------------------------------------------------------------------------------------
    def headline(self, m: dict) -> list[tuple[str, str]]:
        """(metric, formatted value) rows of report.md's summary for one split."""
        raise NotImplementedError

    def split_section(self, m: dict, names: list[str]) -> list[str]:
        """report.md's markdown lines for one split's metrics (below its heading)."""
        raise NotImplementedError

    def plot(self, outputs: np.ndarray, labels: Sequence[Any], m: dict, names: list[str], path, title: str) -> None:
        """The run's results figure (`figure`) for one split's outputs, labels and metrics."""
        raise NotImplementedError


class SingleLabel(Task):
    """One of K classes per text: softmax over K logits, cross-entropy, accuracy."""

    name = "single-label"
    problem_type = "single_label_classification"
    score = "accuracy"
    running = "accuracy"
    running_short = "acc"
    has_classes = True
    history_keys = ("loss", "accuracy", "macro_f1")
    figure = CONFUSION_PNG
    metric_names = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss")

    def outputs(self, num_labels: int) -> int:
        return num_labels

    def label_counts(self, labels, num_labels: int) -> list[int]:
        counts = [0] * num_labels
        for y in labels:
            counts[y] += 1
        return counts

    def balanced_weights(self, labels, num_labels: int) -> list[float]:
        counts = self.label_counts(labels, num_labels)  # a class without training rows gets 1
        return [len(labels) / (num_labels * c) if c else 1.0 for c in counts]

    def targets(self, labels, device):
        import torch

        return torch.as_tensor(list(labels), dtype=torch.long).to(device, non_blocking=True)

    def read_gold(self, raw, labels, data) -> list:
        from loracls.data.labels import map_labels

        # runs written before loracls stored the label values know only the names
        return map_labels(list(raw), **_GOLD, names=labels.names,
                          values=labels.values if labels.values is not None else labels.names, format_names=None,
                          case=data.label_case)

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=label_smoothing, reduction="sum")

    def distill_loss_sum(self, logits, teacher, temperature: float):
        import torch
        import torch.nn.functional as F

        t = temperature  # the teachers' probabilities softened as their logits would be: softmax(log p / T)
        soft = F.softmax(torch.log(teacher.float().clamp_min(1e-12)) / t, dim=-1)
        return t * t * F.kl_div(F.log_softmax(logits.float() / t, dim=-1), soft, reduction="sum")

    def hits(self, logits, targets):
        return (logits.detach().argmax(-1) == targets).sum()

    def labels_of(self, outputs) -> list:
        return [int(j) for j in np.asarray(outputs).argmax(axis=1)]

    def activate(self, logits):
        import torch

        return torch.softmax(logits, dim=-1)

    def activate_np(self, logits: np.ndarray) -> np.ndarray:
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def metrics(self, outputs, labels, names) -> dict:
        return evaluate_probs(outputs, labels, names)

    def agreeing(self, reference, other) -> np.ndarray:
        return reference.argmax(axis=1) == other.argmax(axis=1)  # the same class

    def epoch_summary(self, m: dict) -> str:
        return f"loss {m['loss']:.4f} acc {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f}"

    def summary(self, m: dict) -> str:
        return f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"

    def console_lines(self, m: dict, names) -> list[str]:
        width = max(len(n) for n in names)
        lines = [f"{self.summary(m)}  loss {m['loss']:.4f}  ({m['num_examples']} examples)",
                 f"{'class':<{width}}  precision  recall  f1      support"]
        lines += [f"{name:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  {c['support']}"
                  for name, c in m["per_class"].items()]
        if len(names) <= 30:
            lines.append("confusion matrix (rows: true, columns: predicted):")
            lines += [f"  {name:<{width}}  " + " ".join(f"{v:>6}" for v in row)
                      for name, row in zip(names, m["confusion_matrix"])]
        return lines

    def records(self, outputs, names) -> list[dict]:
        pred = outputs.argmax(axis=1)
        return [{"label": names[p], "label_id": int(p), "probs": {n: float(v) for n, v in zip(names, row)}}
                for p, row in zip(pred, outputs)]

    def csv_header(self, names) -> list[str]:
        return ["label", "label_id"] + [f"prob_{n}" for n in names]

    def csv_cells(self, record: dict, names) -> list:
        return [record["label"], record["label_id"]] + [f"{record['probs'][n]:.6g}" for n in names]

    def kaggle_value(self, record: dict):
        return record["label_id"]

    def headline(self, m: dict) -> list[tuple[str, str]]:
        from loracls.report import classification_headline

        return classification_headline(m)

    def split_section(self, m: dict, names: list[str]) -> list[str]:
        from loracls.report import classification_section

        return classification_section(m, names)

    def plot(self, outputs, labels, m: dict, names: list[str], path, title: str) -> None:
        from loracls.report import plot_confusion_matrix

        plot_confusion_matrix(m["confusion_matrix"], names, path, title=f"{title} confusion matrix")


class MultiLabel(Task):
    """Any number of K labels per text: a sigmoid per logit, binary cross-entropy, micro F1; a label is predicted
    where its output reaches its threshold."""

    name = "multi-label"
    problem_type = "multi_label_classification"
    score = "micro_f1"
    running = "subset_accuracy"
    running_short = "subset acc"
    has_classes = True
    history_keys = ("loss", "micro_f1", "macro_f1")
    figure = PER_LABEL_PNG
    metric_names = ("micro_f1", "macro_f1", "samples_f1", "micro_precision", "micro_recall", "subset_accuracy",
                    "hamming_loss", "loss")
    DEFAULT_THRESHOLD = 0.5

    def __init__(self, thresholds: Sequence[float] | None = None):
        self.thresholds = None if thresholds is None else tuple(float(t) for t in thresholds)

    def cuts(self, num_labels: int) -> np.ndarray:
        """The threshold of each label: the tuned ones, else 0.5."""
        if self.thresholds is None:
            return np.full(num_labels, self.DEFAULT_THRESHOLD)
        return np.asarray(self.thresholds, dtype=np.float64)

    def outputs(self, num_labels: int) -> int:
        return num_labels

    def label_counts(self, labels, num_labels: int) -> list[int]:
        return [int(c) for c in np.asarray(list(labels), dtype=np.int64).reshape(-1, num_labels).sum(axis=0)]

    def balanced_weights(self, labels, num_labels: int) -> list[float]:
        # BCEWithLogitsLoss's pos_weight: a label's negatives over its positives (1 where it has none)
        n = len(labels)
        return [(n - c) / c if c else 1.0 for c in self.label_counts(labels, num_labels)]

    def targets(self, labels, device):
        import torch

        return torch.as_tensor(list(labels), dtype=torch.float32).to(device, non_blocking=True)

    def read_gold(self, raw, labels, data) -> list:
        from loracls.data.labels import map_label_sets

        return map_label_sets(list(raw), **_GOLD, names=labels.names,
                              values=labels.values if labels.values is not None else labels.names,
                              separator=data.label_separator, case=data.label_case)

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        import torch.nn.functional as F

        # summed over the batch, averaged over the labels: the loop's mean over examples is then transformers'
        # BCEWithLogitsLoss (a mean over every label of every row)
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=weights,
                                                  reduction="sum") / logits.shape[-1]

    def distill_loss_sum(self, logits, teacher, temperature: float):
        import torch
        import torch.nn.functional as F

        t = temperature
        teacher_logits = torch.logit(teacher.float().clamp(1e-6, 1 - 1e-6)) / t
        soft = torch.sigmoid(teacher_logits)
        # binary KL per label: the cross-entropy to the soft target minus the target's own entropy
        kl = F.binary_cross_entropy_with_logits(logits.float() / t, soft, reduction="none") - \
            F.binary_cross_entropy_with_logits(teacher_logits, soft, reduction="none")
        return t * t * kl.sum() / logits.shape[-1]

    def hits(self, logits, targets):
        return ((logits.detach() > 0) == (targets > 0.5)).all(dim=-1).sum()

    def labels_of(self, outputs) -> list:
        outputs = np.asarray(outputs)
        return [tuple(int(v) for v in row) for row in outputs >= self.cuts(outputs.shape[1])]

    def activate(self, logits):
        import torch

        return torch.sigmoid(logits.float())

    def activate_np(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits))

    def metrics(self, outputs, labels, names) -> dict:
        from loracls.metrics import multilabel_metrics

        return multilabel_metrics(outputs, labels, names, self.cuts(len(names)))

    def agreeing(self, reference, other) -> np.ndarray:
        cuts = self.cuts(reference.shape[1])  # the same labels over their thresholds
        return ((reference >= cuts) == (other >= cuts)).all(axis=1)

    def tuned(self, outputs, labels, names) -> "MultiLabel":
        from loracls.metrics import tune_thresholds

        return MultiLabel(tune_thresholds(outputs, labels, self.DEFAULT_THRESHOLD))

    def save_decisions(self, run, names) -> None:
        from loracls.atomic import atomic_write_json
        from loracls.rundir import THRESHOLDS_JSON

        atomic_write_json(run.file(THRESHOLDS_JSON), dict(zip(names, self.cuts(len(names)).tolist())))

    def for_run(self, run, names) -> "MultiLabel":
        stored = run.read_thresholds()
        return self if stored is None else MultiLabel(check_thresholds(stored, names, run.file(THRESHOLDS_JSON)))

    def epoch_summary(self, m: dict) -> str:
        return f"loss {m['loss']:.4f} micro-F1 {m['micro_f1']:.4f} macro-F1 {m['macro_f1']:.4f}"

    def summary(self, m: dict) -> str:
        return f"micro-F1 {m['micro_f1']:.4f}  macro-F1 {m['macro_f1']:.4f}  subset accuracy " \
               f"{m['subset_accuracy']:.4f}"

    def console_lines(self, m: dict, names) -> list[str]:
        width = max(len(n) for n in names)
        lines = [f"{self.summary(m)}  samples-F1 {m['samples_f1']:.4f}  Hamming loss {m['hamming_loss']:.4f}  "
                 f"({m['num_examples']} examples)",
                 f"{'label':<{width}}  threshold  precision  recall  f1      support"]
        lines += [f"{name:<{width}}  {c['threshold']:.3f}      {c['precision']:.4f}     {c['recall']:.4f}  "
                  f"{c['f1']:.4f}  {c['support']}" for name, c in m["per_label"].items()]
        return lines

    def records(self, outputs, names) -> list[dict]:
        cuts = self.cuts(len(names))
        out = []
        for row in np.asarray(outputs):
            chosen = sorted(np.flatnonzero(row >= cuts).tolist(), key=lambda j: -row[j])
            out.append({"labels": [names[j] for j in chosen], "label_ids": chosen,
                        "probs": {n: float(v) for n, v in zip(names, row)}})
        return out

    def csv_header(self, names) -> list[str]:
        return ["labels", "label_ids"] + [f"prob_{n}" for n in names]

    def csv_cells(self, record: dict, names) -> list:
        # ';' between labels unless a label holds one ('|' then): the cell reads back with --label-separator
        sep = "|" if any(";" in n for n in names) else ";"
        return [sep.join(record["labels"]), " ".join(map(str, record["label_ids"]))] + \
            [f"{record['probs'][n]:.6g}" for n in names]

    def kaggle_value(self, record: dict):
        return " ".join(map(str, record["label_ids"]))

    def headline(self, m: dict) -> list[tuple[str, str]]:
        from loracls.report import number

        return [("micro F1", number(m.get("micro_f1"), ".4f")), ("macro F1", number(m.get("macro_f1"), ".4f"))]

    def split_section(self, m: dict, names: list[str]) -> list[str]:
        from loracls.report import multilabel_section

        return multilabel_section(m)

    def plot(self, outputs, labels, m: dict, names: list[str], path, title: str) -> None:
        from loracls.report import plot_per_label_f1

        plot_per_label_f1(m["per_label"], path, title=f"{title} F1 per label")


def check_thresholds(stored, names: Sequence[str], where) -> list[float]:
    """A threshold file's {label: threshold} as a list in label order; one line where it does not fit the run's
    labels."""
    if not isinstance(stored, dict):
        raise LoraclsError(f"{where} must hold {{\"label\": threshold, ...}}; fix it, or delete it to use 0.5")
    missing, unknown = [n for n in names if n not in stored], [k for k in stored if k not in names]
    if missing or unknown:
        what = f"lacks label {missing[0]!r}" if missing else f"names {unknown[0]!r}, which is not a label of the run"
        raise LoraclsError(f"{where} {what}; give one threshold per label ({', '.join(names)}), or delete it to use "
                           "0.5")
    bad = [k for k, v in stored.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1]
    if bad:
        raise LoraclsError(f"{where}: the threshold of {bad[0]!r} must be a number from 0 to 1")
    return [float(stored[n]) for n in names]


class Regression(Task):
    """One number per text (a score, a rating): one output, mean squared error, correlations."""

    name = "regression"
    problem_type = "regression"
    score = "spearman"
    running = "mae"
    running_short = "MAE"
    has_classes = False
    history_keys = ("loss", "pearson", "spearman")
    figure = SCATTER_PNG
    metric_names = ("spearman", "pearson", "r2", "mse", "mae", "loss")

    def outputs(self, num_labels: int) -> int:
        return 1

    def targets(self, labels, device):
        import torch

        return torch.as_tensor(list(labels), dtype=torch.float32).to(device, non_blocking=True)

    def read_gold(self, raw, labels, data) -> list:
        from loracls.data.labels import read_scores

        return read_scores(list(raw), **_GOLD)

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        import torch.nn.functional as F

        return F.mse_loss(logits.float().squeeze(-1), targets, reduction="sum")

    def distill_loss_sum(self, logits, teacher, temperature: float):
        import torch.nn.functional as F

        # a value has no distribution to soften: the squared error to the teachers' value
        return F.mse_loss(logits.float().reshape(-1), teacher.float().reshape(-1), reduction="sum")

    def hits(self, logits, targets):
        return (logits.float().squeeze(-1) - targets).abs().sum()

    def labels_of(self, outputs) -> list:
        return [float(v) for v in np.asarray(outputs).reshape(-1)]

    def activate(self, logits):
        return logits

    def activate_np(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def metrics(self, outputs, labels, names) -> dict:
        from loracls.metrics import regression_metrics

        return regression_metrics(np.asarray(outputs, dtype=np.float64).reshape(-1), labels)

    # Values this close, relative to the spread of the reference values, answer alike: a value has no class to
    # agree on, and 5% of a standard deviation is far below any regression's error here (STS-B's MAE is 0.6 of 1.5).
    AGREEMENT_SPREAD = 0.05

    def agreeing(self, reference, other) -> np.ndarray:
        a, b = np.asarray(reference, dtype=np.float64).reshape(-1), np.asarray(other, dtype=np.float64).reshape(-1)
        return np.abs(a - b) <= max(self.AGREEMENT_SPREAD * float(a.std()), 1e-6)

    def epoch_summary(self, m: dict) -> str:
        return f"loss {m['loss']:.4f} Pearson {m['pearson']:.4f} Spearman {m['spearman']:.4f}"

    def summary(self, m: dict) -> str:
        return f"Pearson {m['pearson']:.4f}  Spearman {m['spearman']:.4f}  MAE {m['mae']:.4f}"

    def console_lines(self, m: dict, names) -> list[str]:
        return [f"{self.summary(m)}  MSE {m['mse']:.4f}  R2 {m['r2']:.4f}  ({m['num_examples']} examples)"]

    def records(self, outputs, names) -> list[dict]:
        return [{"value": float(v)} for v in np.asarray(outputs).reshape(-1)]

    def csv_header(self, names) -> list[str]:
        return ["value"]

    def csv_cells(self, record: dict, names) -> list:
        return [f"{record['value']:.6g}"]

    def kaggle_value(self, record: dict):
        return f"{record['value']:.6g}"

    def headline(self, m: dict) -> list[tuple[str, str]]:
        from loracls.report import number

        return [("Pearson", number(m.get("pearson"), ".4f")), ("Spearman", number(m.get("spearman"), ".4f"))]

    def split_section(self, m: dict, names: list[str]) -> list[str]:
        from loracls.report import regression_section

        return regression_section(m)

    def plot(self, outputs, labels, m: dict, names: list[str], path, title: str) -> None:
        from loracls.report import plot_predicted_vs_true

        plot_predicted_vs_true(np.asarray(outputs).reshape(-1), labels, path, title=f"{title} predicted vs true")


# The metrics where lower is better: a sweep chosen on one of them minimizes it.
LOWER_IS_BETTER = ("loss", "mse", "mae", "hamming_loss")


def sweep_metric(task: Task, metric: str | None) -> str:
    """The metric a sweep of `task` is chosen on: `metric` where the task reports it, else its score."""
    if metric is None:
        return task.score
    if metric not in task.metric_names:
        raise LoraclsError(f"--metric {metric!r} is not a metric of a {task.name} run; choose "
                           f"{', '.join(task.metric_names)}")
    return metric


TASKS: dict[str, Task] = {t.name: t for t in (SingleLabel(), MultiLabel(), Regression())}
DEFAULT_TASK = "single-label"


def task_of(config) -> Task:
    """A run's task, from its RunConfig: `auto` (in a run written before tasks were recorded, or before training
    resolved it) is single-label."""
    return get_task(None if config.data.task == "auto" else config.data.task)


def run_task(run, config, names: Sequence[str]) -> Task:
    """A finished run's task with the decision rule it stored (a multi-label run's thresholds)."""
    return task_of(config).for_run(run, names)


def get_task(name: str | None) -> Task:
    """The task called `name`; None (a run written before tasks were recorded) is single-label."""
    try:
        return TASKS[name or DEFAULT_TASK]
    except KeyError:
        raise LoraclsError(f"unknown task {name!r}; choose {', '.join(TASKS)}") from None


__all__ = ["DEFAULT_TASK", "TASKS", "MultiLabel", "Regression", "SingleLabel", "Task", "check_thresholds",
           "LOWER_IS_BETTER", "get_task", "run_task", "sweep_metric", "task_of"]
