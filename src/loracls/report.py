"""What a person reads after a run: report.md, confusion_matrix.png and training_curves.png.

matplotlib is imported lazily and always with the headless Agg backend, so reports render on servers without a
display and importing loracls stays fast.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

from loracls.atomic import atomic_write_bytes
from loracls.rundir import CONFUSION_PNG, CURVES_PNG, PER_LABEL_PNG, SCATTER_PNG

# Past this many classes a full K x K markdown table is unreadable (and K^2 cells run to megabytes): report.md lists
# the weakest classes and the most frequent confusions instead; metrics.json keeps every class and the full matrix.
FULL_MATRIX_MAX_CLASSES = 30
# Past this many classes the cells of a K x K plot get too small for their counts: the PNG shows the most confused
# classes, each cell large enough to read.
PLOT_MAX_CLASSES = 15


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int) -> None:
    """PNG bytes written atomically, like every other file of a run."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def most_confused_classes(cm, limit: int = FULL_MATRIX_MAX_CLASSES) -> list[int]:
    """The `limit` classes with the most errors (missed plus wrongly predicted), in class order."""
    import numpy as np

    cm = np.asarray(cm, dtype=np.int64)
    errors = cm.sum(axis=0) + cm.sum(axis=1) - 2 * np.diag(cm)
    top = np.argsort(-errors, kind="stable")[:limit]
    return sorted(int(i) for i in top)


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 row', '2 rows', '1,000 classes' (`many` for a plural that is not noun + 's')."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# -- plots ------------------------------------------------------------------------------------------------------
def plot_confusion_matrix(cm: list[list[int]], label_names: list[str], path, title: str) -> None:
    """confusion_figure, saved as a PNG."""
    fig = confusion_figure(cm, label_names, title)
    try:
        _save(fig, path, 120)
    finally:
        _pyplot().close(fig)


def confusion_figure(cm: list[list[int]], label_names: list[str], title: str):
    """A matplotlib figure: counts annotated in each cell, colour by the row-normalized share (recall per true
    class).  With more than PLOT_MAX_CLASSES classes, only the most confused ones are drawn, at the size of a small
    matrix (colours keep the share of each true class's full total; the title says how many of how many)."""
    plt = _pyplot()
    import numpy as np

    k = len(label_names)
    counts = np.zeros((k, k), dtype=np.int64)
    if cm:
        arr = np.asarray(cm, dtype=np.int64)
        counts[:arr.shape[0], :arr.shape[1]] = arr[:k, :k]
    row_sums = counts.sum(axis=1, keepdims=True)
    if k > PLOT_MAX_CLASSES:
        keep = most_confused_classes(counts, PLOT_MAX_CLASSES)
        counts, row_sums = counts[np.ix_(keep, keep)], row_sums[keep]
        label_names = [label_names[i] for i in keep]
        title = f"{title}: the {len(keep)} most confused of {k} classes"
        k = len(keep)
    share = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=float), where=row_sums > 0)

    size = max(4.0, 0.8 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    try:
        im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="equal")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("share of the true class")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        rotate = k > 3 or max((len(str(n)) for n in label_names), default=0) > 8
        ax.set_xticklabels(label_names, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                           rotation_mode="anchor")
        ax.set_yticklabels(label_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
        for i in range(k):  # k <= PLOT_MAX_CLASSES: cells of 0.8 inch hold a count at 10 points
            for j in range(k):
                ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center", fontsize=10,
                        color="white" if share[i, j] > 0.5 else "black")
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig


def plot_predicted_vs_true(predicted, true, path, title: str) -> None:
    """A regression's predictions against the true values, with the diagonal where they would be equal."""
    plt = _pyplot()
    import numpy as np

    p, t = np.asarray(predicted, dtype=float), np.asarray(list(true), dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    try:
        ax.scatter(t, p, s=8, alpha=0.4)
        if len(t):
            lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
            ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", label="predicted = true")
            ax.legend(loc="upper left")
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, path, 110)
    finally:
        plt.close(fig)


def plot_per_label_f1(per_label: dict, path, title: str, limit: int = 40) -> None:
    """A multi-label run's F1 per label as horizontal bars, each with its support; past `limit` labels, the
    weakest among those with examples."""
    plt = _pyplot()

    rows = list(per_label.items())
    if len(rows) > limit:
        rows = sorted((kv for kv in rows if kv[1]["support"] > 0), key=lambda kv: kv[1]["f1"])[:limit]
        title += f" ({len(rows)} weakest of {len(per_label)} labels)"
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(rows) + 1.2)))
    try:
        names = [textwrap.shorten(str(n), 30) for n, _ in rows]
        f1 = [c["f1"] for _, c in rows]
        ax.barh(range(len(rows)), f1, color="tab:blue")
        for i, (_, c) in enumerate(rows):
            ax.text(min(c["f1"], 1.0) + 0.01, i, f"{c['f1']:.2f} (n={c['support']:,})", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25)
        ax.set_xlabel("F1 at the label's threshold")
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        _save(fig, path, 110)
    finally:
        plt.close(fig)


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction (the first points are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_training_curves(history: list[dict], path, score: str = "accuracy", running: str = "accuracy") -> None:
    """Left: training loss per logged step (the mean over each logging window, faint, and its moving average),
    learning rate on a twin axis.  Right: the validation `score` per epoch (a task's score metric), with the
    running training metric `running` where the history has it."""
    plt = _pyplot()

    steps = [r for r in history if r.get("type") == "step" and _finite(r.get("step")) and _finite(r.get("loss"))]
    epochs = [r for r in history if r.get("type") == "epoch" and _finite(r.get("epoch"))]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        # Loss vs step, lr on a twin axis.
        if steps:
            xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
            ax_loss.plot(xs, ys, color="tab:blue", alpha=0.3, marker="o" if len(xs) < 3 else None,
                         label="train loss")
            if len(xs) >= 3:
                ax_loss.plot(xs, smooth(ys, 0.6 if len(xs) < 30 else 0.9), color="tab:blue", label="smoothed")
            lr_pts = [(r["step"], r["lr"]) for r in steps if _finite(r.get("lr"))]
            if lr_pts:
                ax_lr = ax_loss.twinx()
                ax_lr.plot([p[0] for p in lr_pts], [p[1] for p in lr_pts], color="tab:orange", alpha=0.7,
                           linestyle="--", marker="o" if len(lr_pts) < 3 else None, label="learning rate")
                ax_lr.set_ylabel("learning rate", color="tab:orange")
                ax_lr.tick_params(axis="y", labelcolor="tab:orange")
                ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:
            ax_loss.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=ax_loss.transAxes)
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("training loss", color="tab:blue")
        ax_loss.set_title("training loss")
        ax_loss.grid(alpha=0.3)

        # The validation score per epoch (the running training metric alongside when logged).
        val = [(r["epoch"], (r.get("validation") or {}).get(score)) for r in epochs]
        val = [(e, a) for e, a in val if _finite(a)]
        train = [(r["epoch"], r.get(f"train_{running}")) for r in epochs if _finite(r.get(f"train_{running}"))]
        if val or train:
            if val:
                ax_acc.plot([e for e, _ in val], [a for _, a in val], marker="o", color="tab:green",
                            label=f"validation {score}")
            if train:
                ax_acc.plot([e for e, _ in train], [a for _, a in train], marker="s", color="tab:gray",
                            linestyle=":", label=f"train {running} (running)")
            ax_acc.legend(loc="lower right")
            xs = sorted({e for e, _ in val + train})
            if all(float(x).is_integer() for x in xs) and len(xs) <= 20:
                ax_acc.set_xticks(xs)
        else:
            ax_acc.text(0.5, 0.5, "no epochs finished", ha="center", va="center", transform=ax_acc.transAxes)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel(score)
        ax_acc.set_title(f"{score} per epoch")
        ax_acc.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, path, 110)
    finally:
        plt.close(fig)


# -- markdown ---------------------------------------------------------------------------------------------------
def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def percent(x: Any, digits: int = 2) -> str:
    """A share as a percentage, or n/a."""
    return f"{100 * x:.{digits}f}%" if _finite(x) else "n/a"


def number(x: Any, fmt: str = ",.1f") -> str:
    """A finite number formatted, or n/a."""
    return format(x, fmt) if _finite(x) else "n/a"


# How the epoch table and the summary name and format the metrics a task records.
_SHORT = {"accuracy": "acc", "macro_f1": "macro F1", "mae": "MAE", "pearson": "Pearson", "spearman": "Spearman",
          "micro_f1": "micro F1", "subset_accuracy": "subset acc"}
_SHARES = ("accuracy", "subset_accuracy")
_FIGURE_TITLES = {CONFUSION_PNG: "Confusion matrix", SCATTER_PNG: "Predicted against true",
                  PER_LABEL_PNG: "F1 per label"}


def _metric(key: str, x: Any) -> str:
    return percent(x) if key in _SHARES else number(x, ".4f")


def _int(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "n/a"


def _duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _per_class_table(m: dict) -> str:
    """Every class, or past FULL_MATRIX_MAX_CLASSES the weakest by F1 among those with examples in the split (a
    class without any has no F1 to rank: scikit-learn writes 0)."""
    rows = []
    per_class = list((m.get("per_class") or {}).items())
    if len(per_class) > FULL_MATRIX_MAX_CLASSES:
        present = [kv for kv in per_class if kv[1].get("support", 0) > 0]
        per_class = sorted(present, key=lambda kv: (kv[1].get("f1", 0.0), -kv[1].get("support", 0)))
        per_class = per_class[:FULL_MATRIX_MAX_CLASSES]
    for name, c in per_class:
        rows.append([_esc(name), number(c.get("precision"), ".4f"), number(c.get("recall"), ".4f"),
                     number(c.get("f1"), ".4f"), _int(c.get("support"))])
    rows.append(["**macro avg**", number(m.get("macro_precision"), ".4f"), number(m.get("macro_recall"), ".4f"),
                 number(m.get("macro_f1"), ".4f"), _int(m.get("num_examples"))])
    return _table(["class", "precision", "recall", "F1", "support"], rows)


def _confusion_table(m: dict, labels: list[str]) -> str:
    cm = m.get("confusion_matrix") or []
    names = labels if len(labels) == len(cm) else list((m.get("per_class") or {}).keys())
    if len(names) != len(cm):
        names = [str(i) for i in range(len(cm))]
    if len(cm) > FULL_MATRIX_MAX_CLASSES:
        return _confused_pairs_table(cm, names)
    header = ["true \\ predicted"] + [_esc(n) for n in names]
    rows = [[f"**{_esc(names[i])}**"] + [_int(x) for x in row] for i, row in enumerate(cm)]
    return _table(header, rows)


def _confused_pairs_table(cm: list[list[int]], names: list[str], limit: int = 20) -> str:
    pairs = sorted(((v, i, j) for i, row in enumerate(cm) for j, v in enumerate(row) if i != j and v),
                   reverse=True)[:limit]
    rows = [[_esc(names[i]), _esc(names[j]), _int(v)] for v, i, j in pairs]
    return (f"The {len(rows)} most frequent confusions of {len(cm)} classes (metrics.json holds the full matrix):"
            "\n\n" + _table(["true class", "predicted as", "count"], rows))


def empty_classes(m: dict) -> tuple[list[str], list[str]]:
    """The classes without an example in the split: (those never predicted either, which scikit-learn's macro
    average leaves out; those predicted, which it counts with F1 0)."""
    per_class = list((m.get("per_class") or {}).items())
    cm = m.get("confusion_matrix") or []
    predicted = [sum(row[j] for row in cm) if len(cm) == len(per_class) else 0 for j in range(len(per_class))]
    empty = [(name, predicted[j]) for j, (name, c) in enumerate(per_class) if c.get("support", 0) == 0]
    return [name for name, p in empty if p == 0], [name for name, p in empty if p > 0]


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(f"`{_esc(n)}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit:,} more" if len(names) > limit else "")


def _macro_note(m: dict) -> str:
    """How the macro averages treat classes without an example in the split; empty when every class has some."""
    left_out, zero = empty_classes(m)
    if not left_out and not zero:
        return ""
    counted = len(m.get("per_class") or {}) - len(left_out)
    note = (f"Macro averages are the unweighted mean over the {plural(counted, 'class', 'classes')} that occur in "
            "this split or were predicted (scikit-learn's default).")
    if left_out:
        note += (f" {plural(len(left_out), 'class', 'classes')} with no example here and never predicted "
                 f"{'is' if len(left_out) == 1 else 'are'} left out: {_names(left_out)}.")
    if zero:
        note += (f" {plural(len(zero), 'class', 'classes')} with no example here but predicted "
                 f"{'counts' if len(zero) == 1 else 'count'} with F1 0: {_names(zero)}.")
    return note


def classification_headline(m: dict) -> list[tuple[str, str]]:
    """report.md's summary rows for one split of a classification task."""
    return [("accuracy", percent(m.get("accuracy"))), ("macro F1", number(m.get("macro_f1"), ".4f"))]


def classification_section(m: dict, labels: list[str]) -> list[str]:
    """report.md's lines for one split of a classification task: the headline, per-class table, confusions."""
    many = len(m.get("per_class") or {}) > FULL_MATRIX_MAX_CLASSES
    with_examples = sum(1 for c in (m.get("per_class") or {}).values() if c.get("support", 0) > 0)
    weakest = min(FULL_MATRIX_MAX_CLASSES, with_examples)
    note = _macro_note(m)
    return [
        f"Accuracy **{percent(m.get('accuracy'))}**, macro F1 **{number(m.get('macro_f1'), '.4f')}** "
        f"on {_int(m.get('num_examples'))} examples.",
        "",
        *([note, ""] if note else []),
        (f"The {plural(weakest, 'class', 'classes')} with the lowest F1 of the {with_examples:,} with examples in "
         "this split (metrics.json has every class):\n\n" if many else "") + _per_class_table(m),
        "",
        "Confusion matrix (rows: true class, columns: predicted class):" if not many else "Confusions:",
        "",
        _confusion_table(m, labels),
        "",
    ]


def regression_section(m: dict) -> list[str]:
    """report.md's lines for one split of a regression."""
    rows = [[name, number(m.get(key), ".4f")] for name, key in
            (("Pearson", "pearson"), ("Spearman", "spearman"), ("MSE", "mse"), ("MAE", "mae"), ("R²", "r2"))]
    return [f"{_int(m.get('num_examples'))} examples.", "", _table(["metric", "value"], rows), ""]


def multilabel_section(m: dict) -> list[str]:
    """report.md's lines for one split of a multi-label task: the averages, then every label (past
    FULL_MATRIX_MAX_CLASSES, the weakest with examples) with its threshold."""
    rows = [[name, _metric(key, m.get(key))] for name, key in
            (("micro F1", "micro_f1"), ("macro F1", "macro_f1"), ("samples F1", "samples_f1"),
             ("micro precision", "micro_precision"), ("micro recall", "micro_recall"),
             ("subset accuracy (every label right)", "subset_accuracy"), ("Hamming loss", "hamming_loss"))]
    per_label = list((m.get("per_label") or {}).items())
    many = len(per_label) > FULL_MATRIX_MAX_CLASSES
    if many:
        per_label = sorted((kv for kv in per_label if kv[1].get("support", 0) > 0),
                           key=lambda kv: kv[1].get("f1", 0.0))[:FULL_MATRIX_MAX_CLASSES]
    lrows = [[_esc(name), number(c.get("threshold"), ".3f"), number(c.get("precision"), ".4f"),
              number(c.get("recall"), ".4f"), number(c.get("f1"), ".4f"), _int(c.get("support"))]
             for name, c in per_label]
    return [f"{_int(m.get('num_examples'))} examples; a label is predicted where its output reaches its threshold "
            "(tuned on the validation set, 0.5 without one).", "",
            _table(["metric", "value"], rows), "",
            ("The labels with the lowest F1 (metrics.json has every label):\n\n" if many else "")
            + _table(["label", "threshold", "precision", "recall", "F1", "support"], lrows), ""]


def render_report(metrics: dict, history: list[dict], config_yaml: str, task=None) -> str:
    """The run's report.md as markdown text.  `task` (loracls.tasks.Task) writes each split's rows and section;
    None reads `metrics` as a classification's."""
    headline = task.headline if task is not None else classification_headline
    section = task.split_section if task is not None else classification_section
    metrics = metrics or {}
    run = metrics.get("run") or {}
    params = metrics.get("parameters") or {}
    timings = metrics.get("timings") or {}
    throughput = metrics.get("throughput") or {}
    data = metrics.get("data") or {}
    train = metrics.get("train") or {}
    labels = [str(x) for x in (metrics.get("labels") or [])]
    test, validation = metrics.get("test"), metrics.get("validation")

    kind = "Fully fine-tuned" if run.get("method") == "full" else "LoRA"
    out = [f"# {kind} classifier: {_esc(run.get('model', 'unknown model'))} ({_esc(run.get('status', 'unknown'))})",
           ""]
    facts = [f"backend `{run.get('backend', '?')}`", f"device `{run.get('device', '?')}`"]
    if run.get("epochs_run") is not None:
        facts.append(f"{run['epochs_run']} epoch(s) run")
    if run.get("best_epoch") is not None:
        facts.append(f"best epoch {run['best_epoch']}")
    out += [", ".join(facts) + ".", ""]

    # Headline.
    rows = []
    for split, m in (("test", test), ("validation", validation)):
        if m:
            rows += [[f"{split} {name}", value] for name, value in headline(m)]
        else:
            rows.append([f"{split} {task.score if task is not None else 'accuracy'}", f"n/a (no {split} set)"])
    running = task.running if task is not None else "accuracy"
    if train:
        rows.append([f"train {running.replace('_', ' ')} (running, best epoch)", _metric(running, train.get(running))])
        rows.append(["train loss (best epoch)", number(train.get("loss"), ".4f")])
    pct = params.get("percent")
    rows.append(["trainable parameters",
                 f"{_int(params.get('trainable'))} of {_int(params.get('total'))}"
                 + (f" ({pct:.3f}%)" if _finite(pct) else "")])
    rows.append(["train time", _duration(timings.get("train_seconds"))])
    rows.append(["eval time", _duration(timings.get("eval_seconds"))])
    rows.append(["total time", _duration(timings.get("total_seconds"))])
    rows.append(["train throughput", f"{number(throughput.get('train_samples_per_second'))} samples/s, "
                                     f"{number(throughput.get('train_tokens_per_second'), ',.0f')} tokens/s"])
    rows.append(["eval throughput", f"{number(throughput.get('eval_samples_per_second'))} samples/s"])
    out += ["## Summary", "", _table(["metric", "value"], rows), ""]

    breakdown = params.get("breakdown") or {}
    if breakdown:
        brows = [[f"`{_esc(k)}`", _int(v)] for k, v in breakdown.items()]
        out += ["Trainable parameters by module:", "", _table(["module", "params"], brows), ""]

    # Per split.
    for split, m in (("test", test), ("validation", validation)):
        if m:
            out += [f"## {split.capitalize()} set", "", *section(m, labels)]
        else:
            out += [f"## {split.capitalize()} set", "", f"No {split} set was evaluated.", ""]
    teachers = metrics.get("teachers")
    if teachers:  # a student (--teacher): its teachers' own figures beside its own
        trows = []
        for split, m in (("test", test), ("validation", validation)):
            if m and teachers.get(split):
                trows += [[f"{split} {name}", value, dict(headline(teachers[split])).get(name, "n/a")]
                          for name, value in headline(m)]
                trows.append([f"{split}: student answers as the teachers", percent(teachers.get(f"{split}_agreement")),
                              ""])
        runs = ", ".join(f"`{_esc(r)}`" for r in teachers.get("runs", []))
        out += ["## Teachers", "", f"Distilled from {runs} (alpha {teachers.get('alpha')}, temperature "
                f"{teachers.get('temperature')}; several teachers are averaged).", "",
                _table(["metric", "student", "teachers"], trows), ""]
        if teachers.get("warnings"):  # they flatter the student's figures above
            out += [f"- **Warning**: {w}." for w in teachers["warnings"]] + [""]
    if test or validation:  # the PNG shows the test set when there is one, else validation
        figure = task.figure if task is not None else CONFUSION_PNG
        out += [f"![{_FIGURE_TITLES.get(figure, 'Results')} ({'test' if test else 'validation'} set)]({figure})", ""]

    # Data.
    truncated, skipped = data.get("truncated") or {}, data.get("skipped_empty") or {}
    drows = []
    for split in ("train", "validation", "test"):
        n = data.get(f"{split}_examples")
        if n is None and split not in truncated and split not in skipped:
            continue
        drows.append([split, _int(n), _int(truncated.get(split, 0)), _int(skipped.get(split, 0))])
    out += ["## Data", ""]
    if drows:
        out += [_table(["split", "examples", "truncated", "skipped (empty text)"], drows), ""]
    else:
        out += ["No data counts recorded.", ""]
    if data.get("reading"):  # what was read and how: the block training printed on stderr
        from loracls.data import summary_lines

        out += ["How the data was read:", "", "```", *summary_lines(data["reading"]), "```", ""]
    if labels:
        out += ["Labels: " + ", ".join(f"`{_esc(x)}`" for x in labels), ""]

    # Epochs.
    epochs = [r for r in (history or []) if r.get("type") == "epoch"]
    keys = task.history_keys if task is not None else ("loss", "accuracy", "macro_f1")
    out += ["## Training", ""]
    if epochs:
        erows = []
        best = run.get("best_epoch")
        for r in epochs:
            v = r.get("validation") or {}
            mark = " (best)" if best is not None and r.get("epoch") == best else ""
            erows.append([f"{r.get('epoch')}{mark}", number(r.get("train_loss"), ".4f"),
                          _metric(running, r.get(f"train_{running}"))] + [_metric(k, v.get(k)) for k in keys])
        out += [_table(["epoch", "train loss", f"train {_SHORT.get(running, running)}"]
                       + [f"val {_SHORT.get(k, k)}" for k in keys], erows), ""]
    else:
        out += ["No epoch finished.", ""]
    out += [f"![Training curves]({CURVES_PNG})", ""]

    # Config.
    out += ["## Resolved config", "", "```yaml", (config_yaml or "").rstrip("\n"), "```", ""]
    return "\n".join(out)


__all__ = ["confusion_figure", "empty_classes", "most_confused_classes", "plot_confusion_matrix", "plot_training_curves",
           "plural", "render_report", "smooth"]
