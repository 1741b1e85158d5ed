"""Multi-label runs: the loss against transformers' own for problem_type multi_label_classification, the metrics
and the tuned thresholds against scikit-learn, the three ways labels are written (a separated list, a JSON list,
0/1 columns), and a run end to end: PEFT reload, export through `pipeline()`, ONNX, the API and a resume after
kill -9, each equal to `loracls predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import killed_then_resumed, run_cli, tiny_train_args, write_csv
from loracls.data import read_examples
from loracls.errors import LoraclsError
from loracls.tasks import MultiLabel, get_task

AG_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


# -- loss, metrics, thresholds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_equals_transformers_multi_label(tiny_bert_dir, weighted):
    """BertForSequenceClassification with problem_type multi_label_classification: BCEWithLogitsLoss, a mean over
    every label of every row.  Balanced weights are its pos_weight: negatives over positives per label."""
    from transformers import AutoModelForSequenceClassification

    task = get_task("multi-label")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=3, problem_type=task.problem_type).eval()
    ids = torch.randint(1000, 2000, (6, 7))
    rows = [(1, 0, 1), (0, 0, 0), (1, 1, 1), (0, 1, 0), (1, 0, 0), (0, 0, 1)]
    y = task.targets(rows, torch.device("cpu"))
    out = model(input_ids=ids, labels=y)
    if not weighted:
        torch.testing.assert_close(task.loss_sum(out.logits, y) / 6, out.loss)
        return
    weights = torch.tensor(task.balanced_weights(rows, 3))
    torch.testing.assert_close(weights, torch.tensor([3 / 3, 4 / 2, 3 / 3]))
    want = torch.nn.BCEWithLogitsLoss(pos_weight=weights)(out.logits, y)
    torch.testing.assert_close(task.loss_sum(out.logits, y, weights=weights) / 6, want)


def _outputs(seed=0, n=300, k=5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < [0.5, 0.3, 0.1, 0.05, 0.0]).astype(int)
    probs = np.clip(0.35 * y + rng.random((n, k)) * 0.7, 0, 1)
    return probs, y


def test_multilabel_metrics_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, log_loss, precision_recall_fscore_support

    probs, y = _outputs()
    names = list("abcde")
    cuts = [0.5, 0.4, 0.6, 0.5, 0.5]
    m = MultiLabel(cuts).metrics(probs, [tuple(r) for r in y], names)
    pred = (probs >= np.array(cuts)).astype(int)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["samples_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=0))
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    assert [m["per_label"][n]["f1"] for n in names] == pytest.approx(f.tolist())
    assert [m["per_label"][n]["support"] for n in names] == s.tolist()
    assert [m["per_label"][n]["threshold"] for n in names] == cuts
    q = np.clip(probs, 1e-12, 1 - 1e-12)
    assert m["loss"] == pytest.approx(np.mean([log_loss(y[:, j], q[:, j], labels=[0, 1]) for j in range(5)]))


def test_tuned_thresholds_reach_the_best_f1_of_each_label():
    """Each label's tuned threshold gives the best F1 any threshold gives on the same outputs (brute force over
    every output as a cut), and a label without positives keeps 0.5."""
    from sklearn.metrics import f1_score

    probs, y = _outputs(1)
    names = list("abcde")
    tuned = MultiLabel().tuned(probs, [tuple(r) for r in y], names)
    for j in range(4):
        best = max(f1_score(y[:, j], probs[:, j] >= t, zero_division=0) for t in np.unique(probs[:, j]))
        got = f1_score(y[:, j], probs[:, j] >= tuned.thresholds[j], zero_division=0)
        assert got == pytest.approx(best)
        assert got >= f1_score(y[:, j], probs[:, j] >= 0.5, zero_division=0)
    assert tuned.thresholds[4] == 0.5
    m = tuned.metrics(probs, [tuple(r) for r in y], names)
    assert m["macro_f1"] >= MultiLabel().metrics(probs, [tuple(r) for r in y], names)["macro_f1"]


# -- reading labels ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ag_multi(agnews_dir):
    """(text, labels) rows of real AG News text: two texts of different classes joined carry both labels."""
    rows = []
    with open(agnews_dir / "train.csv", newline="", encoding="utf-8") as f:
        src = [(int(c) - 1, f"{t}. {d}") for c, t, d in list(csv.reader(f))[:600]]
    i = 0
    while i + 1 < len(src):
        (c1, t1), (c2, t2) = src[i], src[i + 1]
        if c1 == c2 or i % 3 == 0:
            rows.append((t1, [AG_NAMES[c1]]))
            i += 1
        else:
            rows.append((f"{t1} {t2}", [AG_NAMES[c1], AG_NAMES[c2]]))
            i += 2
    return rows


def _write_csv(path: Path, header, rows) -> str:
    return str(write_csv(path, header, rows))


def _label_sets(ex, labels) -> list[set[str]]:
    return [{labels.names[j] for j, v in enumerate(row) if v} for row in ex.labels]


@pytest.mark.parametrize("sep", [",", ";", "|"])
def test_separated_lists_are_read_as_multi_label(ag_multi, tmp_path, sep):
    src = _write_csv(tmp_path / "d.csv", ["text", "labels"], [(t, sep.join(ls)) for t, ls in ag_multi])
    ex, labels = read_examples(src)
    assert ex.reading["task"] == "multi-label" and ex.reading["label_separator"] == sep
    assert sorted(labels.names) == sorted(AG_NAMES)
    assert _label_sets(ex, labels) == [set(ls) for _, ls in ag_multi]
    # the same file read as the run reads it later: through the stored mapping
    again, _ = read_examples(src, labels=labels, task="multi-label", label_separator=sep)
    assert again.labels == ex.labels


def test_json_lists_and_empty_cells(ag_multi, tmp_path):
    records = [{"text": t, "tags": ls if i % 7 else []} for i, (t, ls) in enumerate(ag_multi)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ex, labels = read_examples(str(src), label_column="tags")
    assert ex.reading["task"] == "multi-label"
    assert _label_sets(ex, labels) == [set(r["tags"]) for r in records]
    assert sum(1 for row in ex.labels if not any(row)) == sum(1 for r in records if not r["tags"])


def test_zero_one_columns(ag_multi, tmp_path):
    header = ["text", "world", "sports", "business", "sci_tech"]
    rows = [(t, *[int(n in ls) for n in AG_NAMES]) for t, ls in ag_multi]
    src = _write_csv(tmp_path / "d.csv", header, rows)
    ex, labels = read_examples(src, label_columns="world,sports,business,sci_tech")
    assert ex.reading["task"] == "multi-label" and labels.names == header[1:]
    assert [tuple(r[1:]) for r in rows] == ex.labels
    bad = _write_csv(tmp_path / "bad.csv", header, [*rows[:5], ("text", 1, 2, 0, 0)])
    with pytest.raises(LoraclsError, match=r"line 7 .* '2' in label column 'sports'.* 0 or 1"):
        read_examples(bad, label_columns=header[1:])


def test_multi_label_pairs(ag_multi, tmp_path):
    """A header that names a pair gives a pair, and a column of lists makes the run multi-label, together."""
    rows = [(t[:60], t[60:], ";".join(ls)) for t, ls in ag_multi]
    src = _write_csv(tmp_path / "d.csv", ["sentence1", "sentence2", "label"], rows)
    ex, labels = read_examples(src)
    assert ex.reading["task"] == "multi-label" and ex.reading["text_pair"]
    assert ex.texts == [(a, b) for a, b, _ in rows]
    assert _label_sets(ex, labels) == [set(ls) for _, ls in ag_multi]


def test_a_label_training_never_saw_is_one_line(ag_multi, tmp_path):
    src = _write_csv(tmp_path / "d.csv", ["text", "labels"], [(t, ",".join(ls)) for t, ls in ag_multi])
    _, labels = read_examples(src)
    later = _write_csv(tmp_path / "t.csv", ["text", "labels"], [("a text", "World,Sports"), ("b", "World,Weather")])
    with pytest.raises(LoraclsError, match=r"line 3 .* label 'Weather', which is none of the run's 4 classes"):
        read_examples(later, labels=labels, task="multi-label", label_separator=",")


# -- a run end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_data(tmp_path_factory, ag_multi) -> Path:
    folder = tmp_path_factory.mktemp("multi")
    _write_csv(folder / "train.csv", ["text", "labels"], [(t, ",".join(ls)) for t, ls in ag_multi[:160]])
    _write_csv(folder / "test.csv", ["text", "labels"], [(t, ",".join(ls)) for t, ls in ag_multi[160:220]])
    return folder


def _multi_args(model_dir, data: Path, out: Path, *options) -> list[str]:
    return tiny_train_args(model_dir, data / "train.csv", out, "--test", data / "test.csv", "--lr", "2e-3",
                           "--batch-size", "8", *options)


@pytest.fixture(scope="module", params=["fast", "peft"])
def multi_run(request, tmp_path_factory, tiny_bert_dir, multi_data) -> Path:
    from loracls.cli import main

    out = tmp_path_factory.mktemp(f"multi-{request.param}") / "run"
    assert main(_multi_args(tiny_bert_dir, multi_data, out, "--backend", request.param, "--epochs", "2")) == 0
    return out


def _predicted(run: Path, data: Path, out: Path, *options) -> list[dict]:
    from loracls.cli import main

    assert main(["predict", str(run), "--input", str(data / "test.csv"), "--output", str(out), "--device", "cpu",
                 *options]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_run_stores_its_task_thresholds_and_figure(multi_run, multi_data, tmp_path):
    m = json.loads((multi_run / "metrics.json").read_text())
    assert m["run"]["task"] == "multi-label"
    assert {"micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss"} <= set(m["test"])
    thresholds = json.loads((multi_run / "thresholds.json").read_text())
    assert sorted(thresholds) == sorted(AG_NAMES)
    assert [m["test"]["per_label"][n]["threshold"] for n in thresholds] == list(thresholds.values())
    assert (multi_run / "per_label_f1.png").is_file() and not (multi_run / "confusion_matrix.png").exists()
    assert "micro F1" in (multi_run / "report.md").read_text()
    config = (multi_run / "config.yaml").read_text()
    assert "task: multi-label" in config and "label_separator: ','" in config
    rows = _predicted(multi_run, multi_data, tmp_path / "p.jsonl")
    for row in rows:  # every label over its threshold, highest first, and every score
        over = sorted((n for n in AG_NAMES if row["probs"][n] >= thresholds[n]), key=lambda n: -row["probs"][n])
        assert row["labels"] == over and sorted(row["probs"]) == sorted(AG_NAMES)
    # `evaluate` scores the same predictions as the run did at its end
    from loracls import load

    again = load(multi_run, device="cpu").evaluate(str(multi_data / "test.csv"))
    assert again["micro_f1"] == pytest.approx(m["test"]["micro_f1"], abs=1e-6)


def test_peft_reload_and_export_pipeline_equal_predict(multi_run, multi_data, tmp_path):
    """PEFT loads the adapter onto transformers' model with problem_type multi_label_classification; the export's
    pipeline() (which applies a sigmoid for that problem type) returns the probabilities predict wrote."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from loracls.cli import main

    rows = _predicted(multi_run, multi_data, tmp_path / "p.jsonl")
    want = np.array([[r["probs"][n] for n in sorted(AG_NAMES)] for r in rows])
    texts = [r[0] for r in list(csv.reader(open(multi_data / "test.csv", encoding="utf-8")))[1:]]
    config = (multi_run / "config.yaml").read_text()
    model_dir = next(line.split(": ", 1)[1] for line in config.splitlines() if line.startswith("model:"))
    labels = json.loads((multi_run / "labels.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=4,
                                                              problem_type="multi_label_classification")
    model = PeftModel.from_pretrained(base, str(multi_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.sigmoid(model(**enc).logits).numpy()
    order = [labels.index(n) for n in sorted(AG_NAMES)]
    np.testing.assert_allclose(probs[:, order], want, atol=2e-4)

    assert main(["export", str(multi_run), "--output", str(tmp_path / "export")]) == 0
    clf = pipeline("text-classification", model=str(tmp_path / "export"), top_k=None, truncation=True)
    assert clf.model.config.problem_type == "multi_label_classification"
    got = [{d["label"]: d["score"] for d in out} for out in clf(texts)]
    np.testing.assert_allclose([[g[n] for n in sorted(AG_NAMES)] for g in got], want, atol=2e-4)


def test_onnx_answers_as_predict_does(multi_run, multi_data, tmp_path):
    pytest.importorskip("onnxruntime")
    torch_rows = _predicted(multi_run, multi_data, tmp_path / "t.jsonl")
    onnx_rows = _predicted(multi_run, multi_data, tmp_path / "o.jsonl", "--backend", "onnx")
    a = np.array([[r["probs"][n] for n in AG_NAMES] for r in torch_rows])
    b = np.array([[r["probs"][n] for n in AG_NAMES] for r in onnx_rows])
    np.testing.assert_allclose(a, b, atol=2e-3)  # the torch run computes in bf16 on CPUs with bf16 units
    same = sum(x["labels"] == y["labels"] for x, y in zip(torch_rows, onnx_rows))
    assert same >= len(torch_rows) - 1


def test_api_predicts_and_evaluates_label_lists(multi_run, multi_data):
    from loracls import load

    clf = load(multi_run, device="cpu")
    assert clf.task == "multi-label"
    rows = list(csv.reader(open(multi_data / "test.csv", encoding="utf-8")))[1:]
    texts, gold = [r[0] for r in rows], [r[1] for r in rows]
    as_lists = clf.evaluate(texts, labels=[g.split(",") for g in gold])
    assert as_lists == clf.evaluate(texts, labels=gold)  # "World,Sports" is split as in training
    assert as_lists["micro_f1"] == pytest.approx(clf.evaluate(str(multi_data / "test.csv"))["micro_f1"])
    with pytest.raises(LoraclsError, match="label 'Weather'"):
        clf.evaluate(texts[:2], labels=[["World"], ["Weather"]])


def test_a_threshold_file_that_does_not_fit_is_one_line(multi_run, multi_data, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(multi_run, run)
    thresholds = json.loads((run / "thresholds.json").read_text())
    thresholds["Weather"] = thresholds.pop("World")
    (run / "thresholds.json").write_text(json.dumps(thresholds))
    code, err = run_cli(["predict", run, "--input", multi_data / "test.csv", "--output", tmp_path / "p.jsonl"],
                        capsys)
    assert code == 2 and len(err) == 1 and "thresholds.json lacks label 'World'" in err[0]
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_resume_after_kill_equals_the_uninterrupted_run(tiny_bert_dir, multi_data, tmp_path):
    from loracls.cli import main

    def args(out):
        return _multi_args(tiny_bert_dir, multi_data, out, "--epochs", "3", "--save-every-steps", "2",
                           "--seed", "3", "--backend", "fast")

    assert main(args(tmp_path / "whole")) == 0
    run = tmp_path / "killed"
    if not killed_then_resumed(args(run), run):
        pytest.skip("training finished before the kill landed")
    for name in ("thresholds.json",):
        assert (run / name).read_text() == (tmp_path / "whole" / name).read_text()
    a, b = (json.loads((p / "metrics.json").read_text())["test"] for p in (run, tmp_path / "whole"))
    assert a == b


@pytest.mark.slow
def test_sweep_on_a_multi_label_run_chooses_on_any_metric(tiny_bert_dir, multi_data, tmp_path, capsys):
    """The sweep reads the task from the data (multi-label: micro F1 by default); --metric hamming_loss ranks the
    trials by it, lowest first, and a continued sweep keeps the metric it started with."""
    from loracls.cli import main

    out = tmp_path / "sweep"
    args = ["sweep", "--model", tiny_bert_dir, "--train", multi_data / "train.csv", "--output-dir", out,
            "--budget", "4000", "--trials", "2", "--method", "lora", "--epochs", "1", "--max-length", "16",
            "--metric", "hamming_loss"]
    assert main([str(a) for a in args]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["metric"] == "hamming_loss"
    done = sorted((t for t in board["trials"] if t["rank"]), key=lambda t: t["rank"])
    assert done and [t["validation_hamming_loss"] for t in done] == sorted(t["validation_hamming_loss"] for t in done)
    for t in done:
        m = json.loads((out / "trials" / Path(t["runs"][0]).name / "metrics.json").read_text())
        assert m["run"]["task"] == "multi-label"
        assert m["validation"]["hamming_loss"] == pytest.approx(t["validation_hamming_loss"])
    capsys.readouterr()
    again = [str(a) for a in args]
    again[again.index("--metric") + 1] = "accuracy"
    assert main(again) == 2 and "not a metric of a multi-label run" in capsys.readouterr().err
    again[again.index("--metric") + 1] = "micro_f1"
    assert main(again) == 2 and "chosen on validation hamming_loss" in capsys.readouterr().err


def test_server_answers_every_label_with_its_sigmoid_score(multi_run, multi_data, tmp_path):
    """`loracls serve` of a multi-label run answers as TEI does for such a model: every label with its own
    (sigmoid) score, best first; the scores are `loracls predict`'s, and /info names the task."""
    pytest.importorskip("starlette")
    pytest.importorskip("onnxruntime")
    from test_server import Server, get, post

    rows = _predicted(multi_run, multi_data, tmp_path / "p.jsonl", "--backend", "onnx")
    texts = [r[0] for r in list(csv.reader(open(multi_data / "test.csv", encoding="utf-8")))[1:6]]
    server = Server(multi_run, "--backend", "onnx")
    try:
        status, answers = post(server.url, {"inputs": texts})
        assert status == 200 and len(answers) == len(texts)
        for answer, row in zip(answers, rows):
            assert [a["score"] for a in answer] == sorted((a["score"] for a in answer), reverse=True)
            assert {a["label"]: pytest.approx(a["score"], abs=1e-5) for a in answer} == row["probs"]
        assert json.loads(get(server.url, "/info")[1])["task"] == "multi_label_classification"
    finally:
        assert server.stop() == 0
