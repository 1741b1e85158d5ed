"""Distillation (--teacher): the loss of each task against a hand computation in plain PyTorch, a student's run
end to end (its teachers' figures beside its own, their outputs computed once and read back on resume), and the
one-line refusals of teachers that cannot teach."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from helpers import interrupted_run, predicted_probs, run_cli, tiny_train_args
from loracls import teachers as teachers_module
from loracls.cli import main
from loracls.tasks import get_task


# -- the loss, by hand ---------------------------------------------------------------------------------------------
def test_single_label_kd_is_t2_times_kl_of_softened_distributions():
    torch.manual_seed(0)
    logits, teacher_logits, t = torch.randn(5, 4), torch.randn(5, 4) * 3, 2.5
    teacher = torch.softmax(teacher_logits, -1)  # what a teacher's outputs are: probabilities
    p = torch.softmax(teacher_logits / t, -1)
    q = torch.softmax(logits / t, -1)
    want = t * t * (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(get_task("single-label").distill_loss_sum(logits, teacher, t), want)
    # at T = 1 against a teacher equal to the student, nothing to learn
    assert get_task("single-label").distill_loss_sum(logits, torch.softmax(logits, -1), 1.0).abs() < 1e-5


def test_multi_label_kd_is_binary_kl_per_label():
    torch.manual_seed(1)
    logits, teacher_logits, t = torch.randn(6, 3), torch.randn(6, 3) * 2, 2.0
    p, q = torch.sigmoid(teacher_logits / t), torch.sigmoid(logits / t)
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    want = t * t * kl.sum() / 3
    got = get_task("multi-label").distill_loss_sum(logits, torch.sigmoid(teacher_logits), t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_regression_kd_is_the_squared_error_to_the_teachers_value():
    logits, teacher = torch.tensor([[1.0], [2.5], [0.0]]), torch.tensor([[1.5], [2.0], [1.0]])
    got = get_task("regression").distill_loss_sum(logits, teacher, 3.0)
    assert float(got) == pytest.approx(0.25 + 0.25 + 1.0)


# -- a student end to end --------------------------------------------------------------------------------------
def _args(model_dir, data, out, *extra):
    return tiny_train_args(model_dir, data / "train.csv", out, "--test", data / "test.csv", "--epochs", "2",
                           "--batch-size", "8", "--lr", "2e-3", "--max-train-samples", "96", "--max-eval-samples",
                           "48", "--backend", "fast", "--precision", "fp32", *extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_bert_dir, small_agnews):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(_args(tiny_bert_dir, small_agnews, out, "--seed", "5", "--targets", "all-linear", "--rank", "8")) == 0
    return out


def _counting(monkeypatch) -> list:
    calls = []
    real = teachers_module.compute

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(teachers_module, "compute", counted)
    return calls


def test_student_reports_its_teacher_and_stores_the_outputs(teacher, tiny_bert_dir, small_agnews, tmp_path,
                                                            monkeypatch):
    from loracls import load

    calls = _counting(monkeypatch)
    student = tmp_path / "student"
    assert main(_args(tiny_bert_dir, small_agnews, student, "--teacher", teacher, "--distill-alpha", "0.7")) == 0
    assert len(calls) == 1
    m = json.loads((student / "metrics.json").read_text())
    t = m["teachers"]
    assert t["runs"] == [str(teacher)] and t["alpha"] == 0.7
    # the stored outputs are the teacher's own predictions, and its figures are computed from them
    stored = np.load(student / "teacher_outputs.npz")["test"]
    own = predicted_probs(teacher, small_agnews / "test.csv", tmp_path / "teacher.jsonl")[:48]
    np.testing.assert_allclose(stored, own, atol=1e-5)
    assert t["test"]["accuracy"] == pytest.approx(
        load(teacher, device="cpu").evaluate(str(small_agnews / "test.csv"), max_samples=48)["accuracy"])
    mine = predicted_probs(student, small_agnews / "test.csv", tmp_path / "student.jsonl")[:48]
    assert t["test_agreement"] == pytest.approx(float((mine.argmax(1) == own.argmax(1)).mean()))
    assert "## Teachers" in (student / "report.md").read_text()
    # resumed runs and a second read reuse the stored outputs for the same teachers and texts
    with np.load(student / "teacher_outputs.npz") as f:
        stored = json.loads(str(f["provenance"]))
    assert stored["runs"] == [str(teacher)] and set(stored["texts"]) == {"train", "validation", "test"}


def test_alpha_zero_is_the_plain_run_and_alpha_above_zero_is_not(teacher, tiny_bert_dir, small_agnews, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("plain", ()), ("zero", ("--teacher", teacher, "--distill-alpha", "0")),
                        ("half", ("--teacher", teacher, "--distill-alpha", "0.5"))):
        assert main(_args(tiny_bert_dir, small_agnews, tmp_path / name, *extra)) == 0
        runs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(runs["plain"][k], runs["zero"][k]) for k in runs["plain"])
    assert any(not torch.equal(runs["plain"][k], runs["half"][k]) for k in runs["plain"])


def test_resume_reads_the_outputs_back_and_equals_the_uninterrupted_student(teacher, tiny_bert_dir, small_agnews,
                                                                            tmp_path, monkeypatch):
    from safetensors.torch import load_file

    args = lambda out: _args(tiny_bert_dir, small_agnews, out, "--teacher", teacher, "--save-every-steps", "3")  # noqa: E731
    assert main(args(tmp_path / "whole")) == 0
    assert interrupted_run(args(tmp_path / "stopped"), checkpoints=2) == 130
    calls = _counting(monkeypatch)
    assert main(["train", "--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    assert calls == [], "a resumed student ran its teachers again"
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # outputs stored for another teacher model (or other texts) are not reused
    run = teachers_module.RunDir(tmp_path / "stopped")
    with np.load(run.file("teacher_outputs.npz")) as f:
        source = json.loads(str(f["provenance"]))
    assert teachers_module.read_stored(run, source) is not None
    assert teachers_module.read_stored(run, {**source, "models": ["another model"]}) is None


def test_a_teacher_that_cannot_teach_is_one_line(teacher, tiny_bert_dir, small_agnews, tmp_path, capsys):
    other = tmp_path / "other-labels"
    shutil.copytree(teacher, other)
    (other / "labels.json").write_text(json.dumps(["a", "b", "c", "d"]))
    for bad, words in ((other, "has the labels"), (tmp_path / "nowhere", "is not a loracls run")):
        out = tmp_path / f"student-{bad.name}"
        code, err = run_cli(_args(tiny_bert_dir, small_agnews, out, "--teacher", bad), capsys)
        errors = [line for line in err if not line.startswith("loracls: data:")]  # the data summary comes first
        assert code == 2 and len(errors) == 1 and words in errors[0], err
        assert not out.exists()


@pytest.mark.slow
def test_sweep_searches_alpha_and_temperature_and_runs_the_teachers_once(teacher, tiny_bert_dir, small_agnews,
                                                                         tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    teachers_module._COMPUTED.clear()
    out = tmp_path / "sweep"
    args = ["sweep", "--model", tiny_bert_dir, "--train", small_agnews / "train.csv", "--output-dir", out,
            "--budget", "4000", "--trials", "2", "--method", "lora", "--epochs", "1", "--max-length", "16",
            "--max-train-samples", "64", "--teacher", teacher]
    assert main([str(a) for a in args]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    trained = [t for t in board["trials"] if t["runs"]]
    assert trained and all({"distill_alpha", "distill_temperature"} <= set(t["params"]) for t in trained)
    for t in trained:
        m = json.loads((out / "trials" / Path(t["runs"][0]).name / "metrics.json").read_text())
        assert m["teachers"]["alpha"] == t["params"]["distill_alpha"]
        assert m["teachers"]["runs"] == [str(teacher)]
    assert len(calls) == 1, "every trial ran the teachers again"
