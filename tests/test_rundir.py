"""The run directory on disk: its lock is held until a failed creation is removed and is never released for another
writer, opening a run for writing removes what killed writers left, and an atomic folder reaches the disk before
it appears."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from loracls.errors import LoraclsError
from loracls.rundir import LOCK, RunDir, RunLock


# -- the lock --------------------------------------------------------------------------------------------------------
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


# -- what killed writers leave ---------------------------------------------------------------------------------------
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


# -- atomic folders --------------------------------------------------------------------------------------------------
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
