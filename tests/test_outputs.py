"""What a run writes and says, checked from outside: report.md with many classes against scikit-learn, exports read
by plain `tokenizers` + onnxruntime and by transformers' pipeline(), the Python API's inputs, and output fit for
a log file.  One run on real AG News text, with some 24 classes (AG News' four, each split up to six ways by the
first letter of the title) and a test split that lacks some of them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import loracls
from helpers import softmax, write_csv
from loracls.cli import main

MAX_LENGTH = 32
BUCKETS = ("A-E", "F-J", "K-O", "P-T", "U-Z", "other")
TEST_LACKS = ("U-Z", "other")  # buckets left out of the test split: their classes have no test support


def bucket(title: str) -> str:
    first = title.strip()[:1].upper()
    for b in BUCKETS[:-1]:
        if b[0] <= first <= b[-1]:
            return b
    return "other"


def write_split(src: Path, dst: Path, rows: int, classes: list[str], drop=()) -> list[tuple[str, str]]:
    """The first `rows` AG News rows as text,label with up to 24 labels; rows whose bucket is in `drop` left out."""
    out = []
    for label, title, body in list(csv.reader(src.open(encoding="utf-8")))[:rows]:
        if bucket(title) not in drop:
            out.append((f"{title} {body}", f"{classes[int(label) - 1]}/{bucket(title)}"))
    write_csv(dst, ["text", "label"], out)
    return out


@pytest.fixture(scope="module")
def news(tmp_path_factory, tiny_bert_dir, agnews_dir):
    """A model folder named `model` inside a meaningful one, the 24-class data, and a run trained from the CLI
    with a `..` in the model path, no --output-dir, progress on and stderr not a terminal (a StringIO)."""
    root = tmp_path_factory.mktemp("news")
    model = root / "tiny-bert-news" / "model"
    shutil.copytree(tiny_bert_dir, model)
    (root / "elsewhere").mkdir()
    classes = (agnews_dir / "classes.txt").read_text(encoding="utf-8").split()
    write_split(agnews_dir / "train.csv", root / "train.csv", 480, classes)
    test_rows = write_split(agnews_dir / "test.csv", root / "test.csv", 300, classes, drop=TEST_LACKS)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["train", "--model", "elsewhere/../tiny-bert-news/model", "--train", "train.csv",
                     "--test", "test.csv", "--epochs", "1", "--batch-size", "16", "--max-length", str(MAX_LENGTH),
                     "--lr", "5e-3", "--log-every", "4", "--device", "cpu"])
    assert code == 0, err.getvalue()
    (run,) = (root / "runs").iterdir()
    return {"root": root, "run": run, "stderr": err.getvalue(), "stdout": out.getvalue(), "test_rows": test_rows}


def cm_pairs(cm):
    """(y_true, y_pred) with exactly the confusion matrix's counts: the run's own test predictions."""
    pairs = [(i, j) for i, row in enumerate(cm) for j, n in enumerate(row) for _ in range(n)]
    return [i for i, _ in pairs], [j for _, j in pairs]


# -- 4: many classes ------------------------------------------------------------------------------------------------
def test_report_with_many_classes_against_scikit_learn(news, monkeypatch):
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    import loracls.report as report

    run = news["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    labels, test = metrics["labels"], metrics["test"]
    k = len(labels)  # 24 where the first 480 training rows have every class (AG News' "other" bucket is small)
    assert k >= 20
    y_true, y_pred = cm_pairs(test["confusion_matrix"])
    support = np.bincount(y_true, minlength=k)
    assert (support == 0).sum() >= 6 and len(y_true) == len(news["test_rows"])
    md = (run / "report.md").read_text()
    section = md.split("## Test set")[1].split("## Validation set")[0]

    # The headline and the macro row are scikit-learn's macro F1 on the run's predictions.
    macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert f"macro F1 **{macro:.4f}**" in section
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert f"| **macro avg** | {p:.4f} | {r:.4f} | {f:.4f} |" in section
    # ... which averages over the classes that occur or are predicted: the note says how many, and names the rest.
    used = sorted(set(y_true) | set(y_pred))
    assert f1_score(y_true, y_pred, labels=used, average="macro", zero_division=0) == pytest.approx(macro)
    left_out = [labels[i] for i in range(k) if i not in used]
    assert f"mean over the {len(used)} classes that occur in this split or were predicted" in section
    assert f"{len(left_out)} classes with no example here and never predicted are left out" in section
    assert all(f"`{name}`" in section for name in left_out[:10])

    # With more classes than the table holds, it ranks the weakest among the classes with test examples only.
    monkeypatch.setattr(report, "FULL_MATRIX_MAX_CLASSES", 10)
    md = report.render_report(metrics, [], "")
    table = md.split("## Test set")[1].split("**macro avg**")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and line.endswith(" |")
            and "---" not in line][1:]
    assert len(rows) == 10
    f1s = precision_recall_fscore_support(y_true, y_pred, labels=range(k), zero_division=0)[2]
    for row in rows:
        i = labels.index(row[0][2:].replace("\\|", "|"))
        assert support[i] > 0 and int(row[4].rstrip(" |").replace(",", "")) == support[i]
        assert float(row[3]) == pytest.approx(f1s[i], abs=5e-5)
    ranked = sorted(f1s[support > 0])
    assert [float(row[3]) for row in rows] == pytest.approx(ranked[:10], abs=5e-5)
    assert "lowest F1 of the" in md and f"{int((support > 0).sum())} with examples in this split" in md


def test_confusion_png_past_15_classes_shows_the_most_confused_legibly(news, tmp_path):
    from PIL import Image

    from loracls.report import confusion_figure, plot_confusion_matrix

    metrics = json.loads((news["run"] / "metrics.json").read_text())
    cm, labels = np.array(metrics["test"]["confusion_matrix"]), metrics["labels"]
    errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    fig = confusion_figure(cm.tolist(), labels, "test confusion matrix")
    try:
        ax = fig.axes[0]
        shown = [t.get_text() for t in ax.get_yticklabels()]
        assert len(shown) == 15 and set(shown) <= set(labels)
        # every class left out made no more errors than any class shown
        hidden = [errors[labels.index(n)] for n in labels if n not in shown]
        assert max(hidden) <= min(errors[labels.index(n)] for n in shown)
        cells = [t for t in ax.texts]
        assert len(cells) == 15 * 15 and min(t.get_fontsize() for t in cells) >= 8
        idx = [labels.index(n) for n in shown]
        assert [int(t.get_text().replace(",", "")) for t in cells] == cm[np.ix_(idx, idx)].ravel().tolist()
        assert f"15 most confused of {len(labels)} classes" in ax.get_title().replace("\n", " ")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    # The run's own PNG is that figure: about 120 dpi x (0.8 in per class + margins) for 15 classes.
    width, height = Image.open(news["run"] / "confusion_matrix.png").size
    assert 1500 < height < 2000 and width > height
    plot_confusion_matrix(cm.tolist(), labels, tmp_path / "cm.png", "again")
    assert Image.open(tmp_path / "cm.png").size == (width, height)


# -- 5: exports that hold up outside loracls ------------------------------------------------------------------------
def long_text(news) -> str:
    """About 5,000 words of real news text."""
    words = " ".join(text for text, _ in news["test_rows"]).split()
    return " ".join((words * (5000 // len(words) + 1))[:5000])


def test_exports_truncate_by_themselves(news, tmp_path):
    import onnxruntime as ort
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, pipeline

    run = news["run"]
    texts = [long_text(news), news["test_rows"][0][0], "Oil"]
    served = loracls.load(run, backend="onnx").predict_proba(texts)  # loracls' own truncation at max_length
    onnx_dir = loracls.export(run, tmp_path / "onnx", format="onnx")
    merged_dir = loracls.export(run, tmp_path / "merged")
    for folder in (onnx_dir, merged_dir):
        trunc = json.loads((folder / "tokenizer.json").read_text())["truncation"]
        assert trunc["max_length"] == MAX_LENGTH and trunc["strategy"] == "LongestFirst"
        assert AutoTokenizer.from_pretrained(str(folder)).model_max_length == MAX_LENGTH

    # Plain tokenizers + onnxruntime, nothing else: the file's own truncation and padding make the batch.
    tok = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    enc = tok.encode_batch(texts)
    assert {len(e.ids) for e in enc} == {MAX_LENGTH}
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
            "token_type_ids": [e.type_ids for e in enc]}
    names = [i.name for i in session.get_inputs()]
    logits = session.run(["logits"], {n: np.array(feed[n], dtype=np.int64) for n in names})[0]
    assert np.abs(softmax(logits) - served).max() < 1e-4

    # transformers' pipeline() on the merged folder: truncation=True cuts at the run's max length, not at 512.
    clf = pipeline("text-classification", model=str(merged_dir), top_k=None, truncation=True)
    labels = loracls.load(run).labels
    for scores, ref in zip(clf(texts), served):
        assert max(abs(s["score"] - ref[labels.index(s["label"])]) for s in scores) < 1e-4


# -- 6: the Python API's inputs ------------------------------------------------------------------------------------
def test_api_predict_inputs(news, tmp_path, capsys):
    clf = loracls.load(news["run"], backend="fast")
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, len(clf.labels))
    for bad, fragment in (([None], "texts[0] is None"), (["Oil prices rose.", 3], "texts[1] is an int"),
                          (None, "texts must be a string or a list of strings, not None"),
                          (["ok", b"bytes"], "texts[1] is a bytes")):
        with pytest.raises(loracls.LoraclsError) as e:
            clf.predict(bad)
        assert fragment in str(e.value) and "\n" not in str(e.value)

    # Empty texts are flagged as the CLI flags them, on the same rows with the same probabilities.
    texts = [news["test_rows"][0][0], "", "   ", news["test_rows"][1][0]]
    api = clf.predict(texts)
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    with src.open("w", newline="") as f:
        csv.writer(f).writerows([["text"], *[[t] for t in texts]])
    assert main(["predict", str(news["run"]), "--input", str(src), "--output", str(out), "--backend", "fast"]) == 0
    cli = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("empty_text", False) for r in api] == [r.get("empty_text", False) for r in cli] \
        == [False, True, True, False]
    assert all(a["label"] == c["label"] for a, c in zip(api, cli))

    # An error worded with the CLI's flags names the Python keywords too, when Python called; the CLI's stays short.
    merged = loracls.export(news["run"], tmp_path / "elsewhere" / ".." / "merged")
    assert merged == tmp_path / "merged"
    with pytest.raises(loracls.LoraclsError, match=r"pass --overwrite .*\(in Python: overwrite for --overwrite, "
                                                   r"output_dir for --output\)$"):
        loracls.export(news["run"], merged)
    capsys.readouterr()
    assert main(["export", str(news["run"]), "--output", str(merged)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "in Python" not in err


# -- 7: output fit for logs -----------------------------------------------------------------------------------------
def test_training_output_fit_for_a_log_file(news):
    err = news["stderr"]
    history = [json.loads(line) for line in (news["run"] / "history.jsonl").read_text().splitlines()]
    steps = [h for h in history if h["type"] == "step"]
    assert "\r" not in err  # no progress bar redrawing itself into the file
    lines = [line for line in err.splitlines() if line.startswith("loracls: step ")]
    assert len(lines) == len(steps) >= 3
    assert lines[-1].startswith(f"loracls: step {steps[-1]['step']}/{steps[-1]['step']} ")
    assert "Loading weights" not in err and "Writing model shards" not in err


def test_run_names_and_stored_paths(news):
    run, root = news["run"], news["root"]
    assert run.parent == root / "runs" and run.name.startswith("tiny-bert-news-")
    config = (run / "config.yaml").read_text()
    model = str(root / "tiny-bert-news" / "model")
    assert f"model: {model}\n" in config and ".." not in config
    assert json.loads((run / "run.json").read_text())["model"] == model
    assert f"run directory: {run}\n" in news["stdout"] and ".." not in news["stdout"]

    from loracls.rundir import model_name

    cache = "/home/u/.cache/huggingface/hub/models--FacebookAI--roberta-base/snapshots/e2da8e2f811d1448a5b465c23"
    assert [model_name(m) for m in ("FacebookAI/roberta-base", cache, "/m/my-bert/checkpoint-500", "/m/x/final/")] \
        == ["roberta-base", "roberta-base", "my-bert", "x"]


def test_commands_keep_the_libraries_quiet(news, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    src = tmp_path / "in.csv"
    src.write_text('text\nOil prices rose.\n""\n', encoding="utf-8")
    assert main(["predict", str(news["run"]), "--input", str(src), "--output", str(tmp_path / "p.jsonl"),
                 "--backend", "peft"]) == 0
    assert main(["export", str(news["run"]), "--output", str(tmp_path / "merged")]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "\r" not in err
    assert "1 row has empty text" in err  # one, not "1 rows have"
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before  # a notebook's own again


def test_wording(capsys):
    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "hidden size; or 'auto' with --budget" in help_text and ".;" not in help_text
