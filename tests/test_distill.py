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

from helpers import interrupted_run, killed_then_resumed, predicted_probs, run_cli, tiny_train_args
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
    # the teacher (seed 5) learned this student's validation rows: the resumed run keeps saying so
    whole, stopped = (json.loads((tmp_path / n / "metrics.json").read_text())["teachers"]["warnings"]
                      for n in ("whole", "stopped"))
    assert len(whole) == 1 and stopped == whole
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # outputs stored for another teacher model (or other texts) are not reused
    run = teachers_module.RunDir(tmp_path / "stopped")
    with np.load(run.file("teacher_outputs.npz")) as f:
        source = json.loads(str(f["provenance"]))
    assert teachers_module.read_stored(run, source) is not None
    assert teachers_module.read_stored(run, {**source, "models": ["another model"]}) is None


@pytest.mark.slow
def test_killed_with_sigkill_then_resumed_equals_the_uninterrupted_student(teacher, tiny_bert_dir, small_agnews,
                                                                          tmp_path):
    """kill -9 in a subprocess once the first checkpoint is on disk: the resumed student reads back the teachers'
    outputs the killed process stored (the teachers are not run again) and ends with the uninterrupted student's
    weights and figures."""
    from safetensors.torch import load_file

    def args(out):
        return _args(tiny_bert_dir, small_agnews, out, "--teacher", teacher, "--save-every-steps", "2")

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(args(whole)) == 0
    stored = {}

    def remember_outputs():  # the file as the killed process left it
        stored["bytes"] = (killed / "teacher_outputs.npz").read_bytes()

    resumed = killed_then_resumed(args(killed), killed, before_resume=remember_outputs)
    if resumed is None:
        pytest.skip("training finished before the kill landed (machine too fast for this timing)")
    assert "teacher outputs read back" in resumed.stderr and "teacher outputs from" not in resumed.stderr
    assert stored["bytes"] == (killed / "teacher_outputs.npz").read_bytes() == \
        (whole / "teacher_outputs.npz").read_bytes()
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_whole, m_killed = (json.loads((r / "metrics.json").read_text()) for r in (whole, killed))
    assert m_killed["test"] == m_whole["test"] and m_killed["teachers"]["test"] == m_whole["teachers"]["test"]


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


def test_a_teacher_that_learned_the_students_held_out_rows_is_named(teacher, tiny_bert_dir, small_agnews, tmp_path,
                                                                     capsys):
    """The teacher held out its validation rows with seed 5 and trained on the rest of the same file."""
    def student(name, *extra):
        code, err = run_cli(_args(tiny_bert_dir, small_agnews, tmp_path / name, "--teacher", teacher, *extra), capsys)
        assert code == 0, err
        return [line for line in err if line.startswith("loracls: warning: --teacher")], \
            json.loads((tmp_path / name / "metrics.json").read_text())

    # seed 7 holds out other rows, most of which the teacher learned
    warned, m = student("seed-7", "--seed", "7")
    assert len(warned) == 1 and "validation rows" in warned[0] and "--split-seed" in warned[0], warned
    # kept with the run: in metrics.json and the report
    assert m["teachers"]["warnings"] == [warned[0].removeprefix("loracls: warning: ")]
    assert f"**Warning**: {m['teachers']['warnings'][0]}" in (tmp_path / "seed-7" / "report.md").read_text()
    # held out with the teacher's split seed, they are the teacher's own validation rows: its figure on them is its own
    warned, m = student("split-5", "--seed", "7", "--split-seed", "5")
    assert warned == [] and m["teachers"]["warnings"] == []
    own = json.loads((teacher / "metrics.json").read_text())["validation"]
    assert m["teachers"]["validation"]["confusion_matrix"] == own["confusion_matrix"]
    assert m["teachers"]["validation"]["loss"] == pytest.approx(own["loss"], rel=1e-4)
    # validated or tested on the rows the teacher trained on
    warned, _ = student("validated-on-train", "--validation", small_agnews / "train.csv")
    assert len(warned) == 1 and "validation data" in warned[0], warned
    warned, _ = student("tested-on-train", "--split-seed", "5", "--test", small_agnews / "train.csv")
    assert len(warned) == 1 and "test data" in warned[0], warned


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
    # the teacher's own figures beside the trials, for comparison
    own = json.loads((teacher / "metrics.json").read_text())
    row = board["teachers"] == [{"run": str(teacher), "method": "lora", "trainable": own["parameters"]["trainable"],
                                 "validation_accuracy": own["validation"]["accuracy"], "test_accuracy":
                                     own["test"]["accuracy"]}]
    assert row, board["teachers"]
    md = (out / "leaderboard.md").read_text()
    assert "| distill alpha | T |" in md and f"| {teacher} | lora |" in md


# -- unlabelled texts (--unlabelled) -------------------------------------------------------------------------------
def test_an_unlabelled_text_has_the_distillation_loss_alone():
    """Job.loss_sum on a micro-batch of two labelled rows and two unlabelled ones, against the same sums by hand."""
    from loracls.data import Examples, Labels, Split
    from loracls.job import Job, Teachers

    torch.manual_seed(2)
    task, alpha, t = get_task("single-label"), 0.3, 2.0
    logits, teacher = torch.randn(4, 3), torch.softmax(torch.randn(4, 3) * 2, -1)
    split = Split(Examples(texts=["a", "b"], labels=[0, 2], rows=[0, 1], ids=None, source="x"), [[1], [2]], 0)
    extra = Split(Examples(texts=["c", "d"], labels=None, rows=[0, 1], ids=None, source="u"), [[3], [4]], 0)
    outputs = {"train": teacher[:2].numpy(), "unlabelled": teacher[2:].numpy()}
    job = Job({"train": split, "unlabelled": extra}, Labels(["x", "y", "z"]), task, None, torch.device("cpu"), "fast",
              None, (0, 0), "", teachers=Teachers(["t"], outputs, teacher, alpha, t, {}))
    assert job.training_split().labels == [0, 2, *teacher[2:].argmax(1).tolist()]

    def kd(s, p):
        p_t, q_t = torch.softmax(p.log() / t, -1), torch.softmax(s / t, -1)
        return t * t * (p_t * (p_t.log() - q_t.log())).sum()

    rows = [3, 0, 2, 1]  # a batch in any order
    targets = torch.tensor([0, 0, 0, 2])  # an unlabelled row's target is never read
    ce = torch.nn.functional.cross_entropy(logits[[1, 3]], torch.tensor([0, 2]), reduction="sum")
    want = (1 - alpha) * ce + alpha * kd(logits[[1, 3]], teacher[[0, 1]]) + kd(logits[[0, 2]], teacher[[3, 2]])
    torch.testing.assert_close(job.loss_sum(logits, targets, rows), want)


def _unlabelled_file(small_agnews, path, also_in_test: int) -> Path:
    """Train rows the students do not read (past --max-train-samples 96) as one 'text' column, with the first
    `also_in_test` test texts among them."""
    import csv

    def text(row):
        return " ".join(row[1:])

    train = list(csv.reader((small_agnews / "train.csv").open(encoding="utf-8")))[96:200]
    test = list(csv.reader((small_agnews / "test.csv").open(encoding="utf-8")))[:also_in_test]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([text(r)] for r in [*train[:50], *test, *train[50:]])
    return path


def test_a_student_learns_from_unlabelled_texts_through_its_teacher(teacher, tiny_bert_dir, small_agnews, tmp_path,
                                                                     capsys):
    from safetensors.torch import load_file

    unlabelled = _unlabelled_file(small_agnews, tmp_path / "unlabelled.csv", also_in_test=3)
    runs = {}
    for name, extra in (("labelled", ("--teacher", teacher, "--distill-alpha", "0")),
                        ("unlabelled", ("--teacher", teacher, "--distill-alpha", "0", "--unlabelled", unlabelled))):
        code, err = run_cli(_args(tiny_bert_dir, small_agnews, tmp_path / name, *extra), capsys)
        assert code == 0, err
        runs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    # read with its own column, the texts also in the test split dropped and counted
    said = [line for line in err if "unlabelled" in line]
    assert any("104 texts learned from the teachers' outputs alone, 3 more dropped" in line for line in said), said
    assert any("104 unlabelled" in line for line in said), err
    m = json.loads((tmp_path / "unlabelled" / "metrics.json").read_text())
    assert m["data"]["unlabelled_examples"] == 104 and m["data"]["train_examples"] == 86
    # the teacher's outputs on them are its own predictions
    with np.load(tmp_path / "unlabelled" / "teacher_outputs.npz") as f:
        stored = f["unlabelled"]
    own = predicted_probs(teacher, unlabelled, tmp_path / "teacher-unlabelled.jsonl")
    keep = [i for i in range(107) if not 50 <= i < 53]
    np.testing.assert_allclose(stored, own[keep], atol=1e-5)
    # with alpha 0 a labelled row learns from its label alone: only the unlabelled texts moved the student
    assert any(not torch.equal(runs["labelled"][k], runs["unlabelled"][k]) for k in runs["labelled"])


def test_unlabelled_texts_resume_to_the_uninterrupted_student(teacher, tiny_bert_dir, small_agnews, tmp_path,
                                                              monkeypatch):
    from safetensors.torch import load_file

    unlabelled = _unlabelled_file(small_agnews, tmp_path / "unlabelled.csv", also_in_test=0)
    args = lambda out: _args(tiny_bert_dir, small_agnews, out, "--teacher", teacher, "--unlabelled", unlabelled,  # noqa: E731
                             "--save-every-steps", "5")
    assert main(args(tmp_path / "whole")) == 0
    assert interrupted_run(args(tmp_path / "stopped"), checkpoints=2) == 130
    calls = _counting(monkeypatch)
    assert main(["train", "--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    assert calls == []
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unlabelled_texts_without_a_teacher_are_one_line(tiny_bert_dir, small_agnews, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(_args(tiny_bert_dir, small_agnews, out, "--unlabelled", small_agnews / "test.csv"), capsys)
    assert code == 2 and len(err) == 1 and "--teacher" in err[0] and "--unlabelled" in err[0], err
    assert not out.exists()
