"""Each task's loss, metrics and outputs against the libraries that define them: transformers' own loss for the
same `problem_type`, scikit-learn and scipy for the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loracls.config import TASK_CHOICES
from loracls.tasks import TASKS, get_task


def test_every_task_a_user_can_pick_exists():
    assert set(TASKS) == set(TASK_CHOICES) - {"auto"}


@pytest.mark.parametrize("task_name, num_labels", [("single-label", 3), ("regression", 1)])
def test_loss_equals_transformers_for_the_same_problem_type(tiny_bert_dir, task_name, num_labels):
    """transformers' BertForSequenceClassification computes the loss of its problem_type from the same logits."""
    from transformers import AutoModelForSequenceClassification

    task = get_task(task_name)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=task.outputs(num_labels), problem_type=task.problem_type).eval()
    ids = torch.randint(1000, 2000, (5, 7))
    raw = [0, 2, 1, 1, 0] if task_name == "single-label" else [0.5, 4.2, 3.0, 1.25, 2.0]
    y = task.targets(raw, torch.device("cpu"))
    out = model(input_ids=ids, labels=y)
    assert out.logits.shape == (5, task.outputs(num_labels))
    torch.testing.assert_close(task.loss_sum(out.logits, y) / 5, out.loss)


def test_regression_metrics_equal_scipy_and_sklearn():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    true = rng.uniform(0, 5, 200)
    pred = true + rng.normal(0, 1, 200)
    m = get_task("regression").metrics(pred[:, None].astype(np.float32), true.tolist(), ["score"])
    p32 = pred.astype(np.float32).astype(np.float64)
    assert m["pearson"] == pytest.approx(pearsonr(p32, true)[0])
    assert m["spearman"] == pytest.approx(spearmanr(p32, true)[0])
    assert m["mse"] == pytest.approx(mean_squared_error(true, p32)) == m["loss"]
    assert m["mae"] == pytest.approx(mean_absolute_error(true, p32))
    assert m["r2"] == pytest.approx(r2_score(true, p32))
    assert m["num_examples"] == 200


def test_single_label_metrics_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 4))
    y = rng.integers(0, 4, 50)
    task = get_task("single-label")
    probs = task.activate_np(logits)
    torch.testing.assert_close(torch.as_tensor(probs), torch.softmax(torch.as_tensor(logits), -1))
    m = task.metrics(probs, y.tolist(), list("abcd"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert m["loss"] == pytest.approx(log_loss(y, probs, labels=range(4)))


# -- regression end to end: STS-B's real rows (no header: sentences in columns 7 and 8, the score in 9) -----------
GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


@pytest.fixture(scope="module")
def stsb_small(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stsb")
    for name, n in (("train.tsv", 96), ("dev.tsv", 32)):
        lines = (GLUE / "stsb" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, tiny_bert_dir, stsb_small) -> Path:
    from helpers import tiny_train_args

    from loracls.cli import main

    out = tmp_path_factory.mktemp("reg") / "run"
    assert main(tiny_train_args(tiny_bert_dir, stsb_small / "train.tsv", out, "--test", stsb_small / "dev.tsv",
                                "--task", "regression", "--text-pair-columns", "7,8", "--label-column", "9",
                                "--max-length", "48", "--backend", "peft")) == 0
    return out


def test_regression_run_writes_its_metrics_and_figure(regression_run, stsb_small):
    from scipy.stats import spearmanr

    m = json.loads((regression_run / "metrics.json").read_text())
    assert m["run"]["task"] == "regression" and {"pearson", "spearman", "mse", "mae", "r2"} <= set(m["test"])
    assert (regression_run / "predicted_vs_true.png").is_file() and not (regression_run / "confusion_matrix.png").exists()
    assert "Spearman" in (regression_run / "report.md").read_text()
    assert "task: regression" in (regression_run / "config.yaml").read_text()
    # `loracls predict` gives the value the metrics were computed from
    out = regression_run.parent / "pred.jsonl"
    from loracls.cli import main

    assert main(["predict", str(regression_run), "--input", str(stsb_small / "dev.tsv"), "--output", str(out)]) == 0
    values = [json.loads(line)["value"] for line in out.read_text().splitlines()]
    true = [float(line.split("\t")[9]) for line in (stsb_small / "dev.tsv").read_text().splitlines()]
    assert len(values) == 32 and spearmanr(values, true)[0] == pytest.approx(m["test"]["spearman"], abs=1e-5)


def test_regression_through_onnx_gives_predicts_values(regression_run, stsb_small, tmp_path):
    """`predict --backend onnx` (ONNX Runtime, no torch at inference) gives the values the torch backend gives;
    int8 is written only where it answers within the task's tolerance on the run's held-out texts, else refused in
    one line."""
    pytest.importorskip("onnxruntime")
    from loracls.cli import main

    values = {}
    for backend in ("fast", "onnx"):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["predict", str(regression_run), "--input", str(stsb_small / "dev.tsv"), "--output", str(out),
                     "--backend", backend, "--precision", "fp32"] if backend == "fast" else
                    ["predict", str(regression_run), "--input", str(stsb_small / "dev.tsv"), "--output", str(out),
                     "--backend", backend]) == 0
        values[backend] = np.array([json.loads(line)["value"] for line in out.read_text().splitlines()])
    # a tiny random model's values differ little from row to row: the two backends must agree far more closely
    spread = np.ptp(values["fast"])
    assert spread > 0 and np.abs(values["onnx"] - values["fast"]).max() < 0.05 * spread


def test_regression_export_declares_its_problem_type_and_agrees_with_predict(regression_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loracls import load
    from loracls.cli import main

    assert main(["export", str(regression_run), "--output", str(tmp_path / "export")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    pairs = [("A man is playing a guitar.", "A man plays the guitar."), ("A cat sleeps.", "Stocks fell today.")]
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        want = model(**enc).logits[:, 0].numpy()
    got = [r["value"] for r in load(regression_run).predict(pairs)]
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_regression_on_pairs_resumed_after_kill_equals_the_uninterrupted_run(tiny_bert_dir, stsb_small, tmp_path):
    """Pairs and a float target through SIGKILL and `train --resume`, on the fast backend: the same test metrics and
    the same saved adapter as a run never stopped."""
    from safetensors.torch import load_file

    from helpers import killed_then_resumed, tiny_train_args
    from loracls.cli import main

    def args(out):
        return tiny_train_args(tiny_bert_dir, stsb_small / "train.tsv", out, "--test", stsb_small / "dev.tsv",
                               "--task", "regression", "--text-pair-columns", "7,8", "--label-column", "9",
                               "--max-length", "48", "--backend", "fast", "--epochs", "3", "--batch-size", "8",
                               "--save-every-steps", "2", "--seed", "4")

    assert main([str(a) for a in args(tmp_path / "whole")]) == 0
    run = tmp_path / "killed"
    if not killed_then_resumed(args(run), run):
        pytest.skip("training finished before the kill landed")
    a, b = (json.loads((p / "metrics.json").read_text())["test"] for p in (run, tmp_path / "whole"))
    assert a == b
    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (run, tmp_path / "whole"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_regression_refuses_a_label_that_is_not_a_number(tmp_path, tiny_bert_dir, capsys):
    from helpers import run_cli, tiny_train_args

    data = tmp_path / "d.csv"
    data.write_text("text,score\n" + "".join(f"row {i},{i / 10}\n" for i in range(20)) + "bad row,high\n")
    code, err = run_cli(tiny_train_args(tiny_bert_dir, data, tmp_path / "r", "--task", "regression"), capsys)
    assert code == 2 and len(err) == 1 and "'high'" in err[0] and "not a number" in err[0]


# -- single-label on pairs, end to end: RTE's real rows, its header naming the pair ----------------------------------
@pytest.fixture(scope="module")
def rte_run(tmp_path_factory, tiny_bert_dir) -> Path:
    from helpers import tiny_train_args

    from loracls.cli import main

    folder = tmp_path_factory.mktemp("rte")
    lines = (GLUE / "rte" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "train.tsv").write_text("".join(lines[:81]), encoding="utf-8")
    (folder / "test.tsv").write_text("".join(lines[:1] + lines[81:121]), encoding="utf-8")
    out = folder / "run"
    assert main(tiny_train_args(tiny_bert_dir, folder / "train.tsv", out, "--test", folder / "test.tsv",
                                "--max-length", "64")) == 0
    return out


def test_pair_run_exports_a_pipeline_that_reads_pairs_as_predict_does(rte_run, tmp_path):
    from transformers import pipeline

    from loracls.cli import main

    assert "text_pair_columns" in (rte_run / "config.yaml").read_text()
    out = tmp_path / "pred.jsonl"
    test = rte_run.parent / "test.tsv"
    assert main(["predict", str(rte_run), "--input", str(test), "--output", str(out)]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    assert main(["export", str(rte_run), "--output", str(tmp_path / "export")]) == 0
    clf = pipeline("text-classification", model=str(tmp_path / "export"), top_k=None)
    rows = [line.split("\t") for line in test.read_text(encoding="utf-8").splitlines()[1:]]
    theirs = clf([{"text": r[1], "text_pair": r[2]} for r in rows], truncation=True)  # at the run's max length
    assert len(theirs) == len(ours) == 40
    for mine, scores in zip(ours, theirs):
        got = {s["label"]: s["score"] for s in scores}
        assert max(got, key=got.get) == mine["label"]
        assert all(abs(got[k] - v) < 1e-4 for k, v in mine["probs"].items())


def test_pair_run_refuses_one_text_where_it_reads_pairs(rte_run, tmp_path, capsys):
    from helpers import run_cli

    import loracls

    single = tmp_path / "single.csv"
    single.write_text("text\nA man is playing a guitar.\n")
    code, err = run_cli(["predict", rte_run, "--input", single, "--output", tmp_path / "p.jsonl"], capsys)
    assert code == 2 and len(err) == 1 and "--text-pair-columns" in err[0]
    with pytest.raises(loracls.LoraclsError, match="text pairs"):
        loracls.load(rte_run).predict(["just one text"])


# -- class weights ---------------------------------------------------------------------------------------------------
def test_balanced_class_weights_equal_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    from loracls.job import class_weights

    y = [0] * 70 + [1] * 20 + [2] * 1 + [3] * 9
    want = compute_class_weight("balanced", classes=np.arange(4), y=np.array(y))
    np.testing.assert_allclose(class_weights("balanced", y, list("abcd"), get_task("single-label")), want)


def test_class_weights_file_must_name_every_class(tmp_path):
    import loracls
    from loracls.job import class_weights

    task = get_task("single-label")
    f = tmp_path / "w.json"
    f.write_text('{"a": 1, "b": 2.5}')
    with pytest.raises(loracls.LoraclsError, match="lacks class 'c'"):
        class_weights(str(f), [0, 1], ["a", "b", "c"], task)
    assert class_weights(str(f), [0, 1], ["b", "a"], task) == [2.5, 1.0]
    with pytest.raises(loracls.LoraclsError, match="regression run has none"):
        class_weights("balanced", [0.5], ["score"], get_task("regression"))


def test_weighted_loss_equals_torch_weighted_cross_entropy():
    task = get_task("single-label")
    torch.manual_seed(0)
    logits, y, w = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0.5, 2.0, 1.0])
    want = torch.nn.CrossEntropyLoss(weight=w, reduction="sum")(logits, y)
    torch.testing.assert_close(task.loss_sum(logits, y, weights=w), want)


def test_int8_agreement_means_the_same_answer_for_every_task():
    """onnx_export.check_int8 asks the task whether two sets of outputs answer alike: the class (single-label),
    every label over its threshold (multi-label), a value within 5% of the reference's spread (regression).  An
    argmax over a regression's one output would agree always."""
    from loracls.tasks import MultiLabel

    single = get_task("single-label")
    a = np.array([[0.6, 0.4], [0.2, 0.8]])
    assert single.agreeing(a, np.array([[0.55, 0.45], [0.6, 0.4]])).tolist() == [True, False]
    multi = MultiLabel([0.5, 0.3])
    ref = np.array([[0.6, 0.31], [0.2, 0.9]])
    assert multi.agreeing(ref, np.array([[0.7, 0.29], [0.1, 0.8]])).tolist() == [False, True]
    reg = get_task("regression")
    values = np.linspace(0, 5, 11)[:, None]  # standard deviation 1.58: a tolerance of 0.079
    other = values + np.array([0.05, -0.07, 0.2, 0, 0, 0, 0, 0, 0, 0, -0.5])[:, None]
    assert reg.agreeing(values, other).tolist() == [True, True, False] + [True] * 7 + [False]
