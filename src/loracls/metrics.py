"""Task metrics with scikit-learn and scipy, as plain JSON-serializable Python values.

Per-class rows and the confusion matrix cover every label 0..K-1, so a class absent from the split still gets a row
(support 0).  The macro averages follow scikit-learn's default: they average over the classes that occur in y_true
or y_pred, so a class that is neither present nor predicted does not drag the average down.
"""

from __future__ import annotations

from typing import Sequence


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]) -> dict:
    """{"accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class": {name: {"precision", "recall",
    "f1", "support"}}, "confusion_matrix": [[int]] (rows = true, cols = predicted), "num_examples"}."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true = [int(y) for y in y_true]
    y_pred = [int(y) for y in y_pred]
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    names = [str(n) for n in label_names]
    k = len(names)
    labels = list(range(k))
    out_of_range = sorted({y for y in (*y_true, *y_pred) if not 0 <= y < k})
    if out_of_range:
        raise ValueError(f"label indices {out_of_range} are outside 0..{k - 1} ({k} label names)")

    if not y_true:
        return {
            "accuracy": 0.0, "macro_precision": 0.0, "macro_recall": 0.0, "macro_f1": 0.0,
            "per_class": {n: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for n in names},
            "confusion_matrix": [[0] * k for _ in range(k)],
            "num_examples": 0,
        }

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": [[int(x) for x in row] for row in cm.tolist()],
        "num_examples": len(y_true),
    }


def evaluate_probs(probs, labels: Sequence[int], label_names: Sequence[str]) -> dict:
    """classification_metrics of the argmax, plus "loss": the mean cross-entropy of the probabilities [N, K]."""
    import numpy as np

    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(list(labels), dtype=np.int64)
    metrics = classification_metrics(y.tolist(), probs.argmax(axis=1).tolist(), label_names)
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else 0.0
    return metrics


def regression_metrics(predicted, true) -> dict:
    """{"pearson", "spearman", "mse", "mae", "r2", "loss" (= mse), "num_examples"} of predicted against true
    values.  A correlation that is undefined (fewer than two examples, or a constant side) is 0."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    t = np.asarray(list(true), dtype=np.float64).reshape(-1)
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predictions for {len(t)} true values")
    if not len(t):
        return {"pearson": 0.0, "spearman": 0.0, "mse": 0.0, "mae": 0.0, "r2": 0.0, "loss": 0.0, "num_examples": 0}
    varied = len(t) > 1 and np.ptp(p) > 0 and np.ptp(t) > 0
    mse = float(mean_squared_error(t, p))
    return {"pearson": float(pearsonr(p, t)[0]) if varied else 0.0,
            "spearman": float(spearmanr(p, t)[0]) if varied else 0.0,
            "mse": mse, "mae": float(mean_absolute_error(t, p)),
            "r2": float(r2_score(t, p)) if len(t) > 1 else 0.0, "loss": mse, "num_examples": int(len(t))}


def multilabel_metrics(probs, labels, label_names: Sequence[str], thresholds) -> dict:
    """Metrics of sigmoid outputs [N, K] against 0/1 labels [N, K], a label predicted where its output reaches
    its threshold: {"micro_f1", "macro_f1", "samples_f1", "micro_precision", "micro_recall", "subset_accuracy"
    (every label of a row right), "hamming_loss", "per_label": {name: {"precision", "recall", "f1", "support",
    "threshold"}}, "loss" (mean binary cross-entropy), "num_examples"}.  Averages as scikit-learn's, where a
    label never true nor predicted counts with F1 0."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

    names = [str(n) for n in label_names]
    p = np.asarray(probs, dtype=np.float64).reshape(-1, len(names))
    y = np.asarray(list(labels), dtype=np.int64).reshape(-1, len(names))
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} label rows")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if not len(y):
        return {"micro_f1": 0.0, "macro_f1": 0.0, "samples_f1": 0.0, "micro_precision": 0.0, "micro_recall": 0.0,
                "subset_accuracy": 0.0, "hamming_loss": 0.0, "loss": 0.0, "num_examples": 0,
                "per_label": {n: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "threshold": float(t)}
                              for n, t in zip(names, thresholds)}}
    pred = (p >= thresholds).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    micro_p, micro_r, micro_f1, _ = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return {
        "micro_f1": float(micro_f1),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "samples_f1": float(f1_score(y, pred, average="samples", zero_division=0)),
        "micro_precision": float(micro_p), "micro_recall": float(micro_r),
        "subset_accuracy": float(accuracy_score(y, pred)),
        "hamming_loss": float(hamming_loss(y, pred)),
        "per_label": {name: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                             "support": int(support[j]), "threshold": float(thresholds[j])}
                      for j, name in enumerate(names)},
        "loss": float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean()),
        "num_examples": int(len(y)),
    }


def tune_thresholds(probs, labels, default: float = 0.5) -> list[float]:
    """Per label, the threshold with the best F1 of that label on these outputs: midway between the lowest output
    predicted positive and the next one down, so that a slightly different output decides the same way.  A label
    without a positive row keeps `default`, and so does one whose best F1 is 0."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(list(labels), dtype=np.int64).reshape(p.shape)
    out = []
    for j in range(p.shape[1]):
        positives = int(y[:, j].sum())
        if positives == 0:
            out.append(default)
            continue
        order = np.argsort(-p[:, j], kind="stable")
        scores, hits = p[order, j], y[order, j]
        tp = np.cumsum(hits)
        f1 = 2 * tp / (np.arange(1, len(scores) + 1) + positives)
        # only cut between different outputs: equal outputs always decide alike
        cut_ok = np.append(scores[:-1] > scores[1:], True)
        f1 = np.where(cut_ok, f1, -1.0)
        k = int(np.argmax(f1))
        if f1[k] <= 0:
            out.append(default)
            continue
        below = scores[k + 1] if k + 1 < len(scores) else 0.0
        out.append(float((scores[k] + below) / 2))
    return out


__all__ = ["classification_metrics", "evaluate_probs", "multilabel_metrics", "regression_metrics", "tune_thresholds"]
