"""Off the happy path: nothing lost, nothing silently wrong, every user-caused error one line with exit 2.

One test per class of problem (see issue "Reliability II"); each asserts the exit code, the one-line message, and
that nothing was lost or left behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import loracls.atomic
import loracls.checkpoint  # noqa: F401  (imported now, so that DiskFull finds and patches the writer they bind)
import loracls.peft_format  # noqa: F401
import loracls.report  # noqa: F401
from helpers import loracls_command, run_cli, tiny_train_args, train_args
from loracls.cli import main

ROOT = Path(__file__).resolve().parents[1]


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    text = "\n".join(err)
    assert "Traceback" not in text
    assert err and err[-1].startswith("loracls") and "error:" in err[-1], err
    for f in fragments:
        assert f.lower() in err[-1].lower(), (f, err[-1])


def hidden_leftovers(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (p.name.endswith(".tmp")
                                                                              or p.name.endswith(".old")))


class DiskFull:
    """The disk fills in the middle of a file.  loracls' own atomic writer runs for real, under every name a loracls
    module bound it to (`from loracls.atomic import atomic_write_bytes` keeps a module's own binding, so patching
    loracls.atomic alone would miss the checkpoint and the adapter); for each write whose target `fails(path)`
    accepts, the first half of the bytes reaches the temporary file, then the write fails with `code` (ENOSPC), as
    on a full disk.  `failed` lists those targets, `temporaries` the half-written temporary files they left
    at that instant (the writer must remove them).  Once monkeypatch undoes it, the disk has room again, also for
    a module that imported the writer meanwhile."""

    active = False

    def __init__(self, monkeypatch, fails, code: int = errno.ENOSPC):
        self.fails, self.code, self.failed, self.temporaries = fails, code, [], []
        self._target: Path | None = None
        monkeypatch.setattr(self, "active", True)  # False again when monkeypatch undoes its patches
        real = loracls.atomic.atomic_write_bytes
        disk = self

        class FillingFile:
            def __init__(self, f):
                self._f = f

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def write(self, data):
                target = disk._target
                self._f.write(bytes(data[:len(data) // 2]))
                self._f.flush()
                disk.temporaries += [p for p in target.parent.iterdir()
                                     if p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp")]
                disk.failed.append(target)
                raise OSError(disk.code, os.strerror(disk.code))

        class Os:  # loracls.atomic's `os`, whose fdopen gives a file that fills up mid-write
            def __getattr__(self, name):
                return getattr(os, name)

            def fdopen(self, fd, *args, **kwargs):
                f = os.fdopen(fd, *args, **kwargs)
                return f if disk._target is None else FillingFile(f)

        def write(path, data):
            if not disk.active or not fails(Path(path)):
                return real(path, data)
            disk._target = Path(path)
            try:
                return real(path, data)
            finally:
                disk._target = None

        monkeypatch.setattr(loracls.atomic, "os", Os())
        for name, module in list(sys.modules.items()):
            if (name == "loracls" or name.startswith("loracls.")) and getattr(module, "atomic_write_bytes", None) \
                    is real:
                monkeypatch.setattr(module, "atomic_write_bytes", write)


def write_csv(path: Path, rows: list[tuple], header=("text", "label")) -> Path:
    lines = [",".join(header)] + [",".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run01(tmp_path_factory, tiny_bert_dir):
    """A completed run trained on integer labels 0 and 1 (header file, no classes.txt)."""
    tmp = tmp_path_factory.mktemp("run01")
    data = write_csv(tmp / "d.csv", [(f"sample text number {i}", i % 2) for i in range(24)])
    out = tmp / "run"
    assert main(tiny_train_args(tiny_bert_dir, data, out)) == 0
    return out


# -- data loss -----------------------------------------------------------------------------------------------------
def test_export_overwrite_never_deletes_foreign_files_or_the_run(run01, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, err = run_cli(["export", run01, "--output", mine, "--overwrite"], capsys)
    assert_one_line_error(code, err, "did not write", "thesis.tex")
    assert (mine / "thesis.tex").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    before = sorted(p.name for p in run01.iterdir())
    for target in (run01, run01 / "adapter", run01.parent):
        code, err = run_cli(["export", run01, "--output", target, "--overwrite"], capsys)
        assert_one_line_error(code, err, "run directory")
    assert sorted(p.name for p in run01.iterdir()) == before
    # an export of loracls' own is replaced with --overwrite, refused without it
    out = tmp_path / "export"
    assert main(["export", str(run01), "--output", str(out)]) == 0
    code, err = run_cli(["export", run01, "--output", out], capsys)
    assert_one_line_error(code, err, "--overwrite")
    (out / "notes.txt").write_text("mine")  # a user's file inside an export: protected too
    code, err = run_cli(["export", run01, "--output", out, "--overwrite"], capsys)
    assert_one_line_error(code, err, "notes.txt")
    (out / "notes.txt").unlink()
    assert main(["export", str(run01), "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "loracls_export.json").read_text())["run"] == str(run01)
    assert hidden_leftovers(tmp_path) == []


def test_train_overwrite_removes_only_loracls_files(tiny_bert_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(20)])
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_bert_dir, data, out)) == 0
    (out / "my-notes.md").write_text("keep me")
    assert main(tiny_train_args(tiny_bert_dir, data, out, "--overwrite")) == 0
    assert (out / "my-notes.md").read_text() == "keep me"


# -- silently wrong results ----------------------------------------------------------------------------------------
def test_model_folder_without_tokenizer_is_refused(tiny_bert_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / f, bare / f)
    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(10)])
    code, err = run_cli(tiny_train_args(bare, data, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "no tokenizer files")
    assert not (tmp_path / "run").exists()


def test_label_mapping_is_decided_once_and_stored(run01, tmp_path, capsys):
    """Trained on 0/1: a file holding only label 1 still means class '1', not a shifted class 0."""
    assert json.loads((run01 / "label_values.json").read_text()) == ["0", "1"]
    only_ones = write_csv(tmp_path / "ones.csv", [("sample text number 1", 1), ("sample text number 3", 1)])
    capsys.readouterr()
    assert main(["evaluate", str(run01), "--data", str(only_ones), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["confusion_matrix"][0] == [0, 0] and sum(m["confusion_matrix"][1]) == 2
    # a headerless file of 1s alone, which a fresh read would take as 1-based
    headerless = tmp_path / "h.csv"
    headerless.write_text("1,sample text number 1\n1,sample text number 5\n")
    assert main(["evaluate", str(run01), "--data", str(headerless), "--json"]) == 0
    assert sum(json.loads(capsys.readouterr().out)["confusion_matrix"][1]) == 2
    code, err = run_cli(["evaluate", run01, "--data", write_csv(tmp_path / "two.csv", [("x", 2)])], capsys)
    assert_one_line_error(code, err, "label '2'", "none of the run's 2 classes")


def test_agnews_one_based_labels_stay_one_based(tiny_bert_dir, small_agnews, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_bert_dir, small_agnews / "train.csv", out, "--max-train-samples", "40")) == 0
    capsys.readouterr()
    assert json.loads((out / "label_values.json").read_text()) == ["1", "2", "3", "4"]
    sports = tmp_path / "sports.csv"  # headerless, class 2 only, no classes.txt beside it
    sports.write_text('2,"Yankees win","The Yankees beat the Red Sox."\n')
    assert main(["evaluate", str(out), "--data", str(sports), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"]["Sports"]["support"] == 1


def test_single_class_training_data_is_refused(tiny_bert_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", [(f"text {i}", "spam") for i in range(12)])
    code, err = run_cli(tiny_train_args(tiny_bert_dir, data, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, "single class", "'spam'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("max_length", ["1", "2"])
def test_max_length_must_leave_room_for_text(tiny_bert_dir, tmp_path, capsys, max_length):
    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(10)])
    args = tiny_train_args(tiny_bert_dir, data, tmp_path / "run")
    args[args.index("--max-length") + 1] = max_length
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "leaves no room for text", "--max-length 3")


@pytest.mark.parametrize("fmt", ["kaggle", "jsonl", "csv"])
def test_predict_answers_every_row_and_flags_empty_texts(run01, tmp_path, capsys, fmt):
    src = write_csv(tmp_path / "in.csv", [(10, "first"), (11, ""), (12, "third"), (13, '"   "'), (14, "fifth")],
                    header=("id", "text"))
    out = tmp_path / f"p.{fmt}"
    code, err = run_cli(["predict", run01, "--input", src, "--output", out, "--format", fmt], capsys)
    assert code == 0 and any("2 rows have empty text" in line for line in err)
    lines = out.read_text().splitlines()
    if fmt == "kaggle":
        assert lines == ["ID,Label"] + [f"{i},{lines[i + 1].split(',')[1]}" for i in range(5)]
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in lines]
        assert [r["id"] for r in rows] == ["10", "11", "12", "13", "14"]
        assert [r.get("empty_text", False) for r in rows] == [False, True, False, True, False]
    else:
        assert lines[0].endswith(",empty_text") and [line.split(",")[-1] for line in lines[1:]] == \
            ["0", "1", "0", "1", "0"]


def test_resume_keeps_the_epoch_train_loss(tiny_bert_dir, small_agnews, tmp_path):
    """Interrupt mid-epoch (after a checkpoint between log points), resume: the epoch's train loss and accuracy
    equal an uninterrupted run's."""
    def args(out):
        return train_args(tiny_bert_dir, small_agnews / "train.csv", out, "--epochs", "1", "--max-train-samples", "120",
                          "--batch-size", "8", "--max-length", "24", "--log-every", "5", "--save-every-steps", "3",
                          "--seed", "3", "--lr", "1e-3")

    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(loracls_command(*args(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    ckpt = out / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    if proc.returncode == 130:
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    want = [h for h in (ref / "history.jsonl").read_text().splitlines() if '"epoch"' in h and '"type": "epoch"' in h]
    got = [h for h in (out / "history.jsonl").read_text().splitlines() if '"type": "epoch"' in h]
    w, g = json.loads(want[0]), json.loads(got[0])
    assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-6)
    assert g["train_accuracy"] == pytest.approx(w["train_accuracy"])


# -- runs that move --------------------------------------------------------------------------------------------------
def test_a_run_works_from_another_folder_and_names_a_moved_model(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    import shutil

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_bert_dir, work / "models" / "tiny")
    write_csv(work / "d.csv", [(f"text {i}", i % 2) for i in range(20)])
    monkeypatch.chdir(work)
    assert main(train_args("models/tiny", "d.csv", "runs/r", "--epochs", "1", "--max-length", "16")) == 0
    config = (work / "runs" / "r" / "config.yaml").read_text()
    assert f"model: {work / 'models' / 'tiny'}" in config and f"train: {work / 'd.csv'}" in config
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = work / "runs" / "r"
    assert main(["predict", str(run), "--input", str(work / "d.csv"), "--output", "p.jsonl"]) == 0
    assert main(["export", str(run), "--output", "exported"]) == 0
    (work / "models" / "tiny").rename(work / "models" / "moved")
    code, err = run_cli(["predict", run, "--input", work / "d.csv", "--output", "q.jsonl"], capsys)
    assert_one_line_error(code, err, "no longer exists", "config.yaml")
    assert not (elsewhere / "q.jsonl").exists()


# -- one-line errors ------------------------------------------------------------------------------------------------
def test_output_under_a_file_and_onto_a_file(run01, tiny_bert_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(10)])
    code, err = run_cli(tiny_train_args(tiny_bert_dir, data, blocker / "run"), capsys)
    assert_one_line_error(code, err, "which is a file")
    code, err = run_cli(["export", run01, "--output", blocker], capsys)
    assert_one_line_error(code, err, "is a file")
    code, err = run_cli(["export", run01, "--output", blocker / "sub"], capsys)
    assert_one_line_error(code, err, "which is a file")
    code, err = run_cli(["predict", run01, "--input", data, "--output", blocker / "p.jsonl"], capsys)
    assert_one_line_error(code, err, "is a file")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("code_, words", [(errno.ENOSPC, "no space is left"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission is denied")])
def test_filesystem_errors_are_one_line(run01, tiny_bert_dir, tmp_path, capsys, monkeypatch, code_, words):
    """Disk full, read-only filesystem, permission denied: during train and export, as one line."""
    calls = {"n": 0}

    def seventh_and_later(path):
        calls["n"] += 1
        return calls["n"] > 6  # let the run start, then fail mid-way

    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(20)])
    with monkeypatch.context() as mp:
        disk = DiskFull(mp, seventh_and_later, code_)
        code, err = run_cli(tiny_train_args(tiny_bert_dir, data, tmp_path / "run"), capsys)
    assert_one_line_error(code, err, words)
    assert disk.failed and disk.temporaries
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "running" and not (tmp_path / "run" / "metrics.json").exists()
    assert not any(p.exists() for p in disk.temporaries)
    assert hidden_leftovers(tmp_path / "run") == [] and hidden_leftovers(tmp_path / "run" / "checkpoint") == []

    with monkeypatch.context() as mp:
        disk = DiskFull(mp, lambda path: True, code_)
        code, err = run_cli(["export", run01, "--output", tmp_path / "e"], capsys)
    assert_one_line_error(code, err, words)
    assert disk.failed and not (tmp_path / "e").exists() and hidden_leftovers(tmp_path) == []


def test_disk_full_during_resume_is_one_line_and_loses_nothing(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    """The disk fills while the second checkpoint is written, then again while resuming (in the checkpoint, then
    at the first write of all): one line each time, the last good checkpoint kept byte for byte, no half-written
    file left; once there is room again the run resumes and completes."""
    out = tmp_path / "run"
    ckpt = out / "checkpoint" / "state.pt"
    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(24)])

    def fails_with(fails, *args):
        with monkeypatch.context() as mp:
            disk = DiskFull(mp, fails)
            code, err = run_cli(args, capsys)
        assert_one_line_error(code, err, "no space is left")
        assert not any(p.exists() for p in disk.temporaries)
        assert hidden_leftovers(out) == [] and hidden_leftovers(out / "checkpoint") == []
        return disk

    disk = fails_with(lambda p: p.name == "state.pt" and ckpt.exists(),
                      *tiny_train_args(tiny_bert_dir, data, out, "--save-every-steps", "1", "--batch-size", "4"))
    assert disk.failed == [ckpt] and len(disk.temporaries) == 1  # the second checkpoint, half-written, then gone
    saved = ckpt.read_bytes()
    assert json.loads((out / "run.json").read_text())["status"] != "completed"

    disk = fails_with(lambda p: p.name == "state.pt", "train", "--resume", out, "--no-progress")
    assert disk.failed == [ckpt] and ckpt.read_bytes() == saved
    disk = fails_with(lambda p: True, "train", "--resume", out, "--no-progress")
    assert disk.failed and ckpt.read_bytes() == saved

    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "metrics.json").is_file()


def test_bad_inference_arguments(run01, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", [("a", 0), ("b", 1)])
    for args, fragment in ((["evaluate", run01, "--data", data, "--max-samples", "0"], "--max-samples"),
                           (["predict", run01, "--input", data, "--output", data], "is the input file"),
                           (["predict", run01, "--input", data, "--output", run01 / "metrics.json"], "of the run"),
                           (["evaluate", tmp_path, "--data", data], "holds no loracls run"),
                           (["evaluate", run01, "--data", data, "--text-columns", "nope"], "nope")):
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err) == 1 and fragment in err[0], (args, err)
    assert data.read_text() == "text,label\na,0\nb,1\n"


def test_predict_and_evaluate_take_columns(run01, tmp_path, capsys):
    src = write_csv(tmp_path / "other.csv", [("first text", "x", 0), ("second text", "y", 1)],
                    header=("body", "extra", "target"))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run01), "--input", str(src), "--output", str(out), "--text-columns", "body"]) == 0
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["evaluate", str(run01), "--data", str(src), "--text-columns", "body,extra",
                 "--label-column", "target", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 2


def test_config_files(tmp_path, tiny_bert_dir, capsys):
    from loracls.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-2\nlora:\n  alpha: 1.6e1\n")
    c = load_config(cfg)
    assert (c.train.lr, c.train.weight_decay, c.lora.alpha) == (1e-3, 5e-2, 16.0)
    code, err = run_cli(["train", "--config", tmp_path], capsys)
    assert_one_line_error(code, err, "is a folder, not a YAML file")


def test_messages_are_never_cut_mid_word():
    from loracls.errors import first_line, shorten

    text = "the model could not be found on the local disk and offline mode is on, so nothing was downloaded"
    cut = shorten(text, 50)
    assert len(cut) <= 50 and cut.endswith("...") and text.startswith(cut[:-3]) and text[len(cut) - 3] == " "
    assert first_line(ValueError(text), 60).endswith("...")
    assert first_line(ValueError(""), 60) == "ValueError"


# -- concurrent writers --------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_told_who_holds_the_run(tiny_bert_dir, tmp_path, capsys):
    from loracls.rundir import RunLock

    data = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(20)])
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_bert_dir, data, out)) == 0
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    holder = RunLock(out).acquire("train")  # another process in the middle of writing this run
    try:
        for args in (tiny_train_args(tiny_bert_dir, data, out, "--overwrite"), ["train", "--resume", out]):
            code, err = run_cli(args, capsys)
            assert_one_line_error(code, err, "in use by another loracls process", f"pid {os.getpid()}")
    finally:
        holder.release()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files
    code, err = run_cli(tiny_train_args(tiny_bert_dir, data, out, "--overwrite"), capsys)
    assert code == 0 and not (out / ".loracls-lock").exists()


# -- readable outputs, nothing half-written ---------------------------------------------------------------------------
def test_outputs_respect_the_umask(run01, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "export"
        assert main(["export", str(run01), "--output", str(out)]) == 0
        pred = tmp_path / "p.csv"
        assert main(["predict", str(run01), "--input", str(run01.parent / "d.csv"), "--output", str(pred),
                     "--format", "csv"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    assert pred.stat().st_mode & 0o777 == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run01.rglob("*") if p.is_file())


def test_interrupted_export_leaves_nothing(run01, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (which the CLI turns into the same interrupt) in the middle of writing the model."""
    from transformers import PreTrainedModel

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    assert main(["export", str(run01), "--output", str(tmp_path / "e")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_during_export_leaves_no_temporary_folder(run01, tmp_path):
    out = tmp_path / "e"
    for delay in (1.0, 1.5, 2.0, 3.0):
        proc = subprocess.Popen(loracls_command("export", run01, "--output", out), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        # 130: interrupted and cleaned up; 0: finished first; -15: killed before loracls set its handler up
        assert proc.returncode in (0, 130, -signal.SIGTERM), (proc.returncode, err[-2000:])
        assert hidden_leftovers(tmp_path) == []
        if out.exists():  # it finished first: then it is whole
            assert (out / "loracls_export.json").is_file()
            break


def test_an_interrupt_during_an_import_waits_until_the_import_is_over(tmp_path, monkeypatch):
    """SIGTERM raised inside an import (torch's C initialisation, say) would abort the process; loracls' handler
    lets the import finish and interrupts just after it."""
    import loracls.cli as cli

    (tmp_path / "slow_module_for_loracls_test.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\nFINISHED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    old_alarm = signal.getsignal(signal.SIGALRM)  # _interrupt takes SIGALRM over while it waits for the import
    old = signal.signal(signal.SIGTERM, cli._interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            import slow_module_for_loracls_test  # noqa: F401
            time.sleep(2)  # the interrupt lands here
        assert sys.modules["slow_module_for_loracls_test"].FINISHED
        assert signal.getsignal(signal.SIGALRM) is cli._interrupt  # it did wait for the import, by the timer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGALRM, old_alarm if old_alarm is not None else signal.SIG_DFL)
        monkeypatch.setattr(cli, "_alarm_armed", False)
        sys.modules.pop("slow_module_for_loracls_test", None)


def test_main_restores_the_callers_alarm(monkeypatch):
    """An interrupt that lands during an import arms a SIGALRM timer; main() disarms it and gives SIGALRM back,
    and never touches a timer of the program that called it."""
    from loracls import cli

    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGALRM, mine)
    try:
        monkeypatch.setattr(cli, "_importing", lambda frame: True)
        monkeypatch.setattr(cli, "_run", lambda argv: cli._interrupt(signal.SIGTERM, None) or 0)
        assert cli.main([]) == 0
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        signal.setitimer(signal.ITIMER_REAL, 60)
        monkeypatch.setattr(cli, "_run", lambda argv: 0)
        assert cli.main([]) == 0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- bounded memory ---------------------------------------------------------------------------------------------------
def test_tokenize_cuts_by_characters_first_and_gives_the_same_ids(tiny_bert_dir):
    from loracls.models import load_tokenizer, tokenize

    tok = load_tokenizer(str(tiny_bert_dir))
    long_words = "lorem ipsum dolor sit amet " * 400
    one_word = "x" * 5000 + " end"  # a single word longer than the character cut: cut longer and retried
    texts = [long_words, one_word, "short text"]
    ids, truncated = tokenize(tok, texts, 32)
    want = tok(texts, truncation=True, max_length=32)["input_ids"]
    assert ids == want and truncated == 1  # one_word is [CLS] [UNK] end [SEP]: not truncated
    t0 = time.perf_counter()
    ids, truncated = tokenize(tok, ["word " * 20_000_000], 64)  # a 100 MB line
    assert time.perf_counter() - t0 < 5 and len(ids[0]) == 64 and truncated == 1


# -- scale of labels, report ------------------------------------------------------------------------------------------
def test_a_thousand_classes_give_a_readable_report(tmp_path):
    import numpy as np

    from loracls.metrics import classification_metrics
    from loracls.report import plot_confusion_matrix, render_report

    k = 1000
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, 5000).tolist()
    pred = [t if rng.random() < 0.7 else int(rng.integers(0, k)) for t in y]
    names = [f"class-{i}" for i in range(k)]
    m = classification_metrics(y, pred, names)
    report = render_report({"test": m, "labels": names, "run": {"model": "/very/long/path/to/my/model"}}, [], "")
    assert len(report) < 100_000 and "most frequent confusions" in report
    plot_confusion_matrix(m["confusion_matrix"], names, tmp_path / "cm.png", title="test")
    assert (tmp_path / "cm.png").stat().st_size < 500_000


def test_short_runs_log_many_points_and_the_report_is_polished(run01):
    from loracls.training import log_interval
    from loracls.config import TrainSettings

    assert log_interval(TrainSettings(), 20) == 1 and log_interval(TrainSettings(), 100_000) == 50
    assert log_interval(TrainSettings(log_every=7), 20) == 7
    steps = [json.loads(line) for line in (run01 / "history.jsonl").read_text().splitlines()
             if '"type": "step"' in line]
    assert len(steps) >= 2 and all(isinstance(s["samples_per_s"], float) for s in steps)
    # The curve is one moving average over every step (no restart at epoch boundaries), bias-corrected the way
    # TensorBoard does it: a constant stays constant, and [0, 10] at weight 0.5 gives [0, 5 / 0.75].
    from loracls.report import smooth

    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 20 / 3])


def test_threads_flag(run01, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["predict", str(run01), "--input", str(run01.parent / "d.csv"), "--output",
                     str(tmp_path / "p.jsonl"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    code, err = run_cli(["predict", run01, "--input", run01.parent / "d.csv", "--output", tmp_path / "q.jsonl",
                            "--threads", "0"], capsys)
    assert code == 2 and "threads" in err[-1]


def test_numbers_in_the_config_are_checked_and_coerced():
    from loracls.config import LoraSettings, RunConfig, TrainSettings
    from loracls.errors import LoraclsError

    assert TrainSettings(batch_size=64 / 4).batch_size == 16 and type(TrainSettings(batch_size=16.0).batch_size) is int
    for bad, words in ((dict(lora={"rank": float("nan")}), "finite"), (dict(lora={"layers": "0,a"}), "layer indices"),
                       (dict(train={"seed": 2**40}), "train.seed"), (dict(train={"lr": float("inf")}), "finite"),
                       (dict(train={"epochs": 1.5}), "whole number"),
                       (dict(data={"split_seed": -1}), "data.split_seed"),
                       (dict(data={"split_seed": True}), "data.split_seed")):
        with pytest.raises(LoraclsError, match=words):
            RunConfig.from_dict(bad)
    with pytest.raises(LoraclsError, match="pissa"):
        LoraSettings(method="dora", init="pissa")


def test_predict_a_file_of_empty_texts(run01, tmp_path, capsys):
    src = tmp_path / "empty.csv"
    src.write_text('id,text\n1,""\n2,"  "\n')
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run01), "--input", str(src), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2"] and all(r["empty_text"] for r in rows)


def test_concurrent_onnx_exports_take_turns(run01, tmp_path, monkeypatch):
    """Two servers open a run at once: one exports (under a lock), the other waits and finds the export fresh, so
    the model is exported exactly once."""
    import shutil
    import threading

    import loracls.onnx_export
    from loracls.rundir import RunDir
    from loracls.onnx_inference import ensure_export

    run = tmp_path / "run"
    shutil.copytree(run01, run)  # a run of its own, never exported
    real, exports = loracls.onnx_export.write_onnx, []

    def counted(*args, **kwargs):
        exports.append(threading.current_thread().name)
        time.sleep(0.5)  # a slow export: the other server arrives while it runs
        return real(*args, **kwargs)

    monkeypatch.setattr(loracls.onnx_export, "write_onnx", counted)
    results, errors = [], []

    def open_it():
        try:
            results.append(ensure_export(RunDir.open(run), None))
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 2 and results[0] == results[1] == run / "onnx"
    assert len(exports) == 1, exports
    assert (run / "onnx" / "model.onnx").is_file() and hidden_leftovers(run) == []
    ensure_export(RunDir.open(run), None)  # and a later server reads it
    assert len(exports) == 1
