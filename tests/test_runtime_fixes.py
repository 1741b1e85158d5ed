"""Runtime details that are easy to break: single-process errors keep their nature, a bad torchrun environment is
one line, a failed run creation or resume never leaves or drops a lock at the wrong moment, and the naming
convention the training loop relies on holds for every backend."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loracls import distributed, training
from loracls.errors import LoraclsError
from loracls.rundir import LOCK, RUN_FORMAT_VERSION, RunDir, RunLock


# -- _on_main in a single process ----------------------------------------------------------------------------------
def test_on_main_in_one_process_keeps_the_error_it_got():
    """A bug (an OSError with no user-facing cause) keeps its type, hence its traceback; a user's OSError is left
    to the CLI, which words it.  Neither becomes a 'rank 0 failed' LoraclsError."""
    world = distributed.World()

    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError) as info:
        training._on_main(world, bug)
    assert not isinstance(info.value, LoraclsError) and info.value.errno == errno.EBADF
    assert training._on_main(world, lambda: 41 + 1) == 42


# -- a bad torchrun environment ------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
])
def test_a_bad_torchrun_environment_is_one_line(monkeypatch, env, words):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_WORLD", None)
    with pytest.raises(LoraclsError, match=words) as info:
        distributed.world()
    assert "\n" not in str(info.value) and "torchrun" in str(info.value)
    assert distributed._WORLD is None


def test_a_bad_torchrun_environment_exits_2_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WORLD_SIZE"] = "2"
    res = subprocess.run([sys.executable, "-m", "loracls", "train", "--model", str(tmp_path / "nowhere"),
                          "--train", str(tmp_path / "none.csv"), "--output-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "RANK is not set" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "r").exists()


# -- run directory locks -------------------------------------------------------------------------------------------
def test_a_failed_creation_removes_the_folder_before_it_unlocks(tmp_path, monkeypatch):
    """Between the removal and the release no other `train` may take the folder: it would lose its files."""
    import shutil

    out = tmp_path / "run"
    real_rmtree, seen = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        if Path(path) == out:
            try:
                RunLock(out).acquire("train")
                seen.append("unlocked")
            except LoraclsError:
                seen.append("locked")
        return real_rmtree(path, *args, **kwargs)

    def broken_write_info(self, **fields):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "run.json"))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(RunDir, "write_info", broken_write_info)
    with pytest.raises(OSError):
        RunDir.create(out, overwrite=False)
    assert seen == ["locked"] and not out.exists()


def test_a_released_lock_leaves_another_writers_lock_alone(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    mine = RunLock(folder).acquire("train")
    (folder / LOCK).unlink()  # the folder was removed and made again...
    theirs = RunLock(folder).acquire("train")  # ...and another writer locked it
    mine.release()
    assert (folder / LOCK).exists()
    with pytest.raises(LoraclsError, match="in use"):
        RunLock(folder).acquire("train")
    theirs.release()
    assert not (folder / LOCK).exists()


def _run_folder(tmp_path: Path, info) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(info if isinstance(info, str) else json.dumps(info))
    return run


def test_resuming_a_completed_run_is_refused_and_unlocked(tmp_path):
    run = _run_folder(tmp_path, {"status": "completed", "format_version": RUN_FORMAT_VERSION})
    with pytest.raises(LoraclsError, match="already completed"):
        training._open_for_resume(str(run))
    assert not (run / LOCK).exists()
    RunLock(run).acquire("train --resume").release()


@pytest.mark.parametrize("info, words", [("{not json", "corrupt"),
                                         ({"status": "interrupted", "format_version": 99}, "format version")])
def test_a_refused_resume_releases_its_lock(tmp_path, info, words):
    run = _run_folder(tmp_path, info)
    with pytest.raises(LoraclsError, match=words):
        training._open_for_resume(str(run))
    assert not (run / LOCK).exists()
    RunLock(run).acquire("train --resume").release()


def test_resume_opens_with_run_json_read_once_under_the_lock(tmp_path, monkeypatch):
    run = _run_folder(tmp_path, {"status": "interrupted", "format_version": RUN_FORMAT_VERSION})
    reads, real = [], RunDir.read_info

    def read_info(self):
        reads.append((self.path / LOCK).exists())
        return real(self)

    monkeypatch.setattr(RunDir, "read_info", read_info)
    opened = training._open_for_resume(str(run))
    try:
        assert reads == [True] and opened.info["status"] == "interrupted"
    finally:
        opened.release()


# -- the names the training loop relies on -------------------------------------------------------------------------
@pytest.mark.parametrize("backend, lora", [
    ("peft", {"head": "native"}), ("peft", {"head": "linear"}), ("peft", {"head": "native-lora"}),
    ("peft", {"method": "dora"}), ("fast", {"head": "native"}), ("fast", {"head": "linear"}), ("fast", {"head": "native-lora"}),
])
def test_lora_in_a_name_marks_every_tensor_but_the_heads(tiny_bert_dir, backend, lora):
    """make_optimizer groups by name: 'lora_' for LoRA (and DoRA's magnitudes), everything else is the head."""
    from helpers import build_model

    from loracls.config import LoraSettings

    model = build_model(tiny_bert_dir, backend, LoraSettings(rank=2, **lora))
    names = [n for n, _ in model.trainable_named_parameters()]
    assert any("lora_B" in n for n in names)
    assert all("lora_" in n or ".classifier." in n for n in names), names


# -- TensorBoard -----------------------------------------------------------------------------------------------------
def _tb_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--train", str(data / "train.csv"), "--output-dir", str(out),
            "--epochs", "1", "--batch-size", "8", "--max-train-samples", "64", "--max-length", "32", "--device", "cpu",
            "--no-progress", "--log-to", "tensorboard", "--log-every", "1", "--save-every-steps", "2", *extra]


def test_a_missing_tensorboard_is_refused_before_the_run_folder_exists(tiny_bert_dir, small_agnews, tmp_path,
                                                                       monkeypatch, capsys):
    from loracls.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert main(_tb_args(tiny_bert_dir, small_agnews, tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_resumed_run_logs_each_step_once_and_closes_its_writer(tiny_bert_dir, small_agnews, tmp_path, monkeypatch):
    """Killed one step past its checkpoint (step 4), the run had logged step 5; the resumed run logs step 5 again,
    and TensorBoard keeps only the second.  An interrupted run's writer is closed all the same."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loracls import tblog
    from loracls.cli import main

    real_record, real_close, closed, die_at = tblog.TensorBoard.record, tblog.TensorBoard.close, [], [5]

    def record(self, r):
        real_record(self, r)
        if r["type"] == "step" and r["step"] in die_at:
            die_at.clear()
            raise KeyboardInterrupt  # as if killed after step 5 reached the log, before its checkpoint

    def close(self):
        closed.append(1)
        real_close(self)

    monkeypatch.setattr(tblog.TensorBoard, "record", record)
    monkeypatch.setattr(tblog.TensorBoard, "close", close)
    out = tmp_path / "r"
    assert main(_tb_args(tiny_bert_dir, small_agnews, out)) == 130
    assert closed == [1] and json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 9)), steps  # 64 examples, batch 8: 8 steps, each once


# -- atomic folders ----------------------------------------------------------------------------------------------------
def test_an_atomic_folder_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """Whatever wrote the files inside did not fsync them: atomic_folder does, before `out` appears."""
    from loracls import atomic

    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "rename", rename)
    with atomic.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"x" * 100)
        (tmp / "config.json").write_text("{}")
    inodes = {(tmp_path / "out" / p).stat().st_ino for p in ("sub/weights.bin", "config.json", "sub", ".")}
    synced = {ino for kind, ino in events[:events.index(("rename", "out"))] if kind == "fsync"}
    assert inodes <= synced


# -- checkpoint format -------------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    import torch

    from loracls import checkpoint

    path = tmp_path / "run" / "checkpoint" / "state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"version": 1, "rng": {"torch": torch.get_rng_state()}}, path)  # version 1: rng a dict or a list
    with pytest.raises(LoraclsError, match=r"incompatible loracls \(format 1, this one reads 2\).*--overwrite"):
        checkpoint.load(path)


def test_a_classifier_warmup_keeps_lora_out_of_the_optimizer_until_it_ends(tiny_bert_dir, small_agnews, tmp_path,
                                                                          monkeypatch):
    """8 steps, half of them warm-up: through step 4 AdamW holds moments for the head's tensors alone (LoRA's
    gradients were dropped: the loop finds those tensors through the optimizer's groups), then for all."""
    from loracls.cli import main

    real_save, moments = training.checkpoint.save, {}

    def save(path, state, **kwargs):
        held = {id(p) for p, s in kwargs["optimizer"].state.items() if s}
        groups = kwargs["optimizer"].param_groups
        moments[state.step] = [sum(id(p) in held for p in g["params"]) for g in groups]
        real_save(path, state, **kwargs)

    monkeypatch.setattr(training.checkpoint, "save", save)
    assert main(["train", "--model", str(tiny_bert_dir), "--train", str(small_agnews / "train.csv"),
                 "--output-dir", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "8", "--max-train-samples",
                 "64", "--max-length", "32", "--device", "cpu", "--no-progress", "--save-every-steps", "1",
                 "--head-warmup-ratio", "0.5"]) == 0
    head, a, b = moments[8]
    assert head > 0 and a > 0 and b > 0
    assert all(moments[step] == [head, 0, 0] for step in (1, 2, 3, 4)), moments


def test_opening_a_run_for_writing_removes_what_killed_writers_left(tmp_path):
    """SIGKILL runs no cleanup, so a cut atomic write leaves its hidden temporary file or folder; the next process
    that locks the run (resume, or train --overwrite) deletes them, and nothing else."""
    run = RunDir.create(tmp_path / "run", overwrite=False)
    run.release()
    stale_file = run.path / "checkpoint" / ".state.pt.k3j2x9.tmp"
    stale_file.write_bytes(b"half a checkpoint")
    stale_folder = run.path / ".adapter.q8w7e6.tmp"
    (stale_folder / "inner").mkdir(parents=True)
    (stale_folder / "inner" / "adapter_model.safetensors").write_bytes(b"half")
    kept = run.path / "notes.tmp"  # not a loracls temporary: not hidden
    kept.write_text("mine")
    RunDir.open(run.path).release()  # opening to read never deletes
    assert stale_file.exists() and stale_folder.exists()
    RunDir.open(run.path, lock_for="train --resume").release()
    assert not stale_file.exists() and not stale_folder.exists() and kept.read_text() == "mine"
