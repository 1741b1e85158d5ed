"""loracls.metrics and loracls.report: hand-checked metrics, valid PNGs, and a readable report.md."""

from __future__ import annotations

import json

import pytest

from loracls.metrics import classification_metrics
from loracls.report import plot_confusion_matrix, plot_training_curves, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["World", "Sports", "Business"]

# true 0: 3 right, 1 as class 1      -> row [3, 1, 0]
# true 1: 2 right                     -> row [0, 2, 0]
# true 2: 1 as class 0, 2 as class 1  -> row [1, 2, 0]
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 0, 1, 1]


def test_metrics_hand_computed():
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 0], [1, 2, 0]]
    assert m["num_examples"] == 9
    assert m["accuracy"] == pytest.approx(5 / 9)
    # precision: World 3/4, Sports 2/5, Business 0 (never predicted; zero_division=0)
    # recall:    World 3/4, Sports 2/2, Business 0/3
    pc = m["per_class"]
    assert pc["World"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    f1_sports = 2 * 0.4 * 1.0 / 1.4
    assert pc["Sports"] == pytest.approx({"precision": 0.4, "recall": 1.0, "f1": f1_sports, "support": 2})
    assert pc["Business"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert m["macro_precision"] == pytest.approx((0.75 + 0.4 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.75 + 1.0 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + f1_sports + 0) / 3)
    json.dumps(m)  # plain Python values only
    assert type(m["accuracy"]) is float and type(pc["World"]["support"]) is int
    assert all(type(x) is int for row in m["confusion_matrix"] for x in row)


def test_metrics_absent_class():
    # Class 3 ("Sci/Tech") neither occurs nor is predicted: it still gets a row and a column.
    names = NAMES + ["Sci/Tech"]
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], names)
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["per_class"]["Sci/Tech"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["accuracy"] == pytest.approx(0.75)
    # macro averages over the classes that occur in y_true or y_pred (scikit-learn's default)
    assert m["macro_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_metrics_empty():
    m = classification_metrics([], [], NAMES)
    assert m["num_examples"] == 0 and m["accuracy"] == 0.0
    assert m["confusion_matrix"] == [[0] * 3 for _ in range(3)]
    json.dumps(m)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000


HISTORY = [
    {"type": "step", "step": 10, "epoch": 0.25, "loss": 1.30, "lr": 1e-4, "samples_per_s": 100.0},
    {"type": "step", "step": 20, "epoch": 0.5, "loss": 1.10, "lr": 2e-4, "samples_per_s": 110.0},
    {"type": "step", "step": 30, "epoch": 0.75, "loss": 0.90, "lr": 1.8e-4, "samples_per_s": 105.0},
    {"type": "epoch", "epoch": 1, "train_loss": 1.05, "train_accuracy": 0.61,
     "validation": {"accuracy": 0.70, "macro_f1": 0.68, "loss": 0.85}},
    {"type": "step", "step": 40, "epoch": 1.25, "loss": 0.70, "lr": 1.2e-4, "samples_per_s": 108.0},
    {"type": "epoch", "epoch": 2, "train_loss": 0.72, "train_accuracy": 0.76,
     "validation": {"accuracy": 0.78, "macro_f1": 0.77, "loss": 0.66}},
]


@pytest.mark.parametrize("history", [HISTORY, [], HISTORY[:1], HISTORY[3:4]], ids=["full", "empty", "one-step",
                                                                                    "one-epoch"])
def test_training_curves_png(tmp_path, history):
    path = tmp_path / "training_curves.png"
    plot_training_curves(history, path)
    _assert_png(path)


def test_confusion_matrix_png(tmp_path):
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    path = tmp_path / "confusion_matrix.png"
    plot_confusion_matrix(m["confusion_matrix"], NAMES, path, "test set")
    _assert_png(path)
    empty = tmp_path / "empty.png"
    plot_confusion_matrix([[0, 0], [0, 0]], ["a", "b"], empty, "nothing")
    _assert_png(empty)


def _metrics(test, validation):
    return {
        "run": {"model": "FacebookAI/roberta-base", "backend": "fast", "device": "cpu", "status": "completed",
                "best_epoch": 2, "epochs_run": 2},
        "parameters": {"trainable": 925_444, "total": 125_574_152, "percent": 0.737,
                       "breakdown": {"query": 110_592, "key": 110_592, "value": 110_592, "head": 593_668}},
        "train": {"accuracy": 0.76, "loss": 0.72},
        "validation": validation,
        "test": test,
        "timings": {"train_seconds": 125.3, "eval_seconds": 4.2, "total_seconds": 131.0},
        "throughput": {"train_samples_per_second": 95.5, "train_tokens_per_second": 12000.0,
                       "eval_samples_per_second": 400.0},
        "data": {"train_examples": 1000, "validation_examples": 100, "test_examples": 9,
                 "truncated": {"train": 12, "validation": 1, "test": 0},
                 "skipped_empty": {"train": 3, "validation": 0, "test": 0}},
        "labels": NAMES,
    }


CONFIG_YAML = "model: FacebookAI/roberta-base\nlora:\n  rank: 6\n"


def test_render_report():
    test = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    val = classification_metrics([0, 1, 2], [0, 1, 2], NAMES)
    md = render_report(_metrics(test, val), HISTORY, CONFIG_YAML)
    assert md.startswith("# ") and "FacebookAI/roberta-base" in md.splitlines()[0] and "completed" in md
    for name in NAMES:
        assert name in md
    assert "55.56%" in md          # test accuracy 5/9
    assert "100.00%" in md         # validation accuracy
    assert "925,444" in md and "0.737%" in md
    assert "| **World** | 3 | 1 | 0 |" in md
    assert "confusion_matrix.png" in md and "training_curves.png" in md
    assert "```yaml\n" + CONFIG_YAML + "```" in md
    assert "2 (best)" in md        # epochs table marks the best epoch
    assert "| train | 1,000 | 12 | 3 |" in md


def test_render_report_without_eval_sets():
    md = render_report(_metrics(None, None), [], CONFIG_YAML)
    assert "no test set" in md and "No validation set was evaluated." in md
    assert "```yaml" in md
    md = render_report({}, [], "")
    assert md.startswith("# ")


def test_report_says_how_the_macro_average_treats_classes_without_examples():
    from sklearn.metrics import f1_score

    names = NAMES + ["Sci/Tech"]
    # Business: no example but predicted once (counts with F1 0); Sci/Tech: neither (left out).
    y_true, y_pred = [0, 1, 1], [0, 1, 2]
    m = classification_metrics(y_true, y_pred, names)
    md = render_report(_metrics(m, None), [], "")
    assert f"macro F1 **{f1_score(y_true, y_pred, average='macro', zero_division=0):.4f}**" in md
    assert "mean over the 3 classes that occur in this split or were predicted" in md
    assert "1 class with no example here and never predicted is left out: `Sci/Tech`." in md
    assert "1 class with no example here but predicted counts with F1 0: `Business`." in md
    full = render_report(_metrics(classification_metrics(Y_TRUE, Y_PRED, NAMES), None), [], "")
    assert "Macro averages are" not in full  # every class has examples: nothing to explain
