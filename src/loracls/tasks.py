"""What a task is: everything that depends on the shape of the answer, written once per task.

A task turns a run's labels into training targets, scores logits against them (the loss), turns logits into
outputs (the activation), measures outputs against labels (the metrics), names the metric that picks the best
epoch and ranks sweep trials, formats a prediction row, writes its sections of report.md, and names the
`problem_type` an exported transformers model declares.  The training loop, the checkpoint, the predictors, the
report, the sweep, the export and the planner ask the run's task and never assume one.

| task           | outputs | loss                 | activation | best epoch / sweep | problem_type                |
|----------------|---------|----------------------|------------|--------------------|-----------------------------|
| `single-label` | K       | cross-entropy        | softmax    | accuracy           | single_label_classification |
| `regression`   | 1       | mean squared error   | none       | Spearman           | regression                  |

Torch is imported inside the methods that need it (loss, hits, activation on tensors): ONNX serving asks the task
for outputs and rows without torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from loracls.errors import LoraclsError
from loracls.metrics import evaluate_probs
from loracls.rundir import CONFUSION_PNG, SCATTER_PNG


class Task:
    """The facts and functions of one task shape.  Subclasses fill them in; instances hold no state."""

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

    def outputs(self, num_labels: int) -> int:
        """Width of the head (and of the logits) for `num_labels` labels."""
        raise NotImplementedError

    # -- training (torch) ---------------------------------------------------------------------------------------
    def targets(self, labels: Sequence[Any], device) -> Any:
        """The training targets of a batch's labels, as a tensor on `device`."""
        raise NotImplementedError

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        """The loss summed over the batch (the loop divides by the step's example count).  `weights`: one per
        class (--class-weights), where the task takes them."""
        raise NotImplementedError

    def hits(self, logits, targets):
        """The running training metric summed over the batch, as a tensor (no host sync)."""
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

    def outputs(self, num_labels: int) -> int:
        return num_labels

    def targets(self, labels, device):
        import torch

        return torch.as_tensor(list(labels), dtype=torch.long).to(device, non_blocking=True)

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=label_smoothing, reduction="sum")

    def hits(self, logits, targets):
        return (logits.detach().argmax(-1) == targets).sum()

    def activate(self, logits):
        import torch

        return torch.softmax(logits, dim=-1)

    def activate_np(self, logits: np.ndarray) -> np.ndarray:
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def metrics(self, outputs, labels, names) -> dict:
        return evaluate_probs(outputs, labels, names)

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

    def outputs(self, num_labels: int) -> int:
        return 1

    def targets(self, labels, device):
        import torch

        return torch.as_tensor(list(labels), dtype=torch.float32).to(device, non_blocking=True)

    def loss_sum(self, logits, targets, *, label_smoothing: float = 0.0, weights=None):
        import torch.nn.functional as F

        return F.mse_loss(logits.float().squeeze(-1), targets, reduction="sum")

    def hits(self, logits, targets):
        return (logits.float().squeeze(-1) - targets).abs().sum()

    def activate(self, logits):
        return logits

    def activate_np(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def metrics(self, outputs, labels, names) -> dict:
        from loracls.metrics import regression_metrics

        return regression_metrics(np.asarray(outputs, dtype=np.float64).reshape(-1), labels)

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


TASKS: dict[str, Task] = {t.name: t for t in (SingleLabel(), Regression())}
DEFAULT_TASK = "single-label"


def task_of(config) -> Task:
    """A run's task, from its RunConfig: `auto` (in a run written before tasks were recorded, or before training
    resolved it) is single-label."""
    return get_task(None if config.data.task == "auto" else config.data.task)


def get_task(name: str | None) -> Task:
    """The task called `name`; None (a run written before tasks were recorded) is single-label."""
    try:
        return TASKS[name or DEFAULT_TASK]
    except KeyError:
        raise LoraclsError(f"unknown task {name!r}; choose {', '.join(TASKS)}") from None


__all__ = ["DEFAULT_TASK", "TASKS", "SingleLabel", "Task", "get_task", "task_of"]
