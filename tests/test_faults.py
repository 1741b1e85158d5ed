"""Every command, every filesystem fault: one line on stderr, exit code 2, and nothing half-written left looking
complete, whichever library was writing (loracls' own writer, safetensors, tokenizers, PyTorch's ONNX exporter,
ONNX Runtime's optimizer and quantizer, SQLite under Optuna, TensorBoard).

The faults are real: a small filesystem of its own (tmpfs) filled until only a page is left, then a write
grows past it (ENOSPC), or remounted read-only (EROFS); a path under a file (ENOTDIR); the command's folder removed
as loracls starts its first file or folder there (ENOENT).  Mounting needs root (CAP_SYS_ADMIN): where the test may
not mount, the two faults that need it fall back to what an unprivileged process can make real, a file-size limit
(`ulimit -f`, EFBIG) for the full disk and a folder without write permission for read-only.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import loracls.atomic
from helpers import tiny_train_args
from loracls import training
from loracls.cli import main
from loracls.errors import machine_error_message

ROOM = 4096  # what a full disk has left: one page, so the first small files fit and the model's weights do not


def run_cli(args) -> tuple[int, list[str]]:
    """The exit code and the stderr lines of `loracls ARGS`, in this process: every line, a library's writer
    thread's included (sys.stderr itself is replaced while it runs, where helpers.run_cli reads pytest's capture)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue().strip().splitlines()


def write_csv(path: Path, n: int) -> Path:
    words = ["markets", "rally", "team", "wins", "chip", "faster", "rain", "storm"]
    rows = [f'"{" ".join(words[(i + j) % 8] for j in range(12))} {i}",{i % 2}' for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def run_args(model_dir, data, out, *extra):
    return tiny_train_args(model_dir, data, out, "--batch-size", "8", *extra)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bert_dir):
    """A completed run, an interrupted one (killed just after its first checkpoint), and their data."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_csv(tmp / "d.csv", 96)
    assert main(run_args(tiny_bert_dir, data, tmp / "run")) == 0
    real_save = training.checkpoint.save

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt  # as if killed just after the checkpoint reached the disk

    training.checkpoint.save = save_then_die
    try:
        assert main(run_args(tiny_bert_dir, data, tmp / "stopped", "--save-every-steps", "1")) == 130
    finally:
        training.checkpoint.save = real_save
    return {"data": data, "run": tmp / "run", "stopped": tmp / "stopped", "model": tiny_bert_dir}


# -- the commands ----------------------------------------------------------------------------------------------------
@dataclass
class Command:
    """What a command writes into `place` (a folder the fault is made in): `args(place, inputs, elsewhere)` and
    `prepare` (runs to copy into the place first); `looks_complete(place)` is what must not be true after a
    failure."""
    args: Callable
    prepare: tuple = ()
    looks_complete: Callable | None = None


def _export(fmt, *extra):
    return Command(lambda place, i, elsewhere: ["export", i["run"], "--output", place / "export", "--format", fmt,
                                                *extra],
                   looks_complete=lambda place: (place / "export").exists())


def _served(command, *extra):
    """predict / evaluate --backend onnx: the fault hits the ONNX folder written into the run (the predictions
    themselves go elsewhere)."""
    def args(place, i, elsewhere):
        tail = ["--output", elsewhere / "p.jsonl"] if command == "predict" else []
        return [command, place / "run", "--input" if command == "predict" else "--data", i["data"], "--backend",
                "onnx", *tail, *extra]
    return Command(args, prepare=("run",), looks_complete=lambda place: (place / "run" / "onnx").exists())


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text())["status"]
    except (OSError, ValueError):
        return None


COMMANDS = {
    "train": Command(lambda place, i, _: run_args(i["model"], i["data"], place / "run"),
                     looks_complete=lambda place: _status(place / "run") == "completed"
                     or (place / "run" / "metrics.json").exists()),
    "train --log-to tensorboard": Command(lambda place, i, _: run_args(i["model"], i["data"], place / "run",
                                                                     "--log-to", "tensorboard"),
                                          looks_complete=lambda place: _status(place / "run") == "completed"),
    "resume": Command(lambda place, i, _: ["train", "--resume", place / "stopped", "--no-progress"],
                      prepare=("stopped",),
                      looks_complete=lambda place: _status(place / "stopped") == "completed"
                      or (place / "stopped" / "metrics.json").exists()),
    "evaluate --backend onnx": _served("evaluate"),
    "predict": Command(lambda place, i, _: ["predict", i["run"], "--input", i["data"], "--output",
                                            place / "p.jsonl"],
                       looks_complete=lambda place: (place / "p.jsonl").exists()),
    "predict --backend onnx": _served("predict"),
    "export transformers": _export("transformers"),
    "export onnx": _export("onnx"),
    "export onnx int8": _export("onnx", "--quantize", "int8"),
    "sweep": Command(lambda place, i, _: ["sweep", "--model", i["model"], "--train", i["data"], "--output-dir",
                                          place / "sweep", "--budget", "100000", "--trials", "1", "--epochs", "1",
                                          "--max-length", "16", "--device", "cpu", "--validation-fraction", "0.25"],
                     looks_complete=lambda place: any((place / "sweep").rglob("metrics.json"))
                     or any((place / "sweep").rglob("leaderboard.json"))),
}
# The commands whose output path the user names: only those can be given a path under a file.
NAMED_OUTPUT = ("train", "predict", "export transformers", "export onnx", "export onnx int8", "sweep")


# -- the faults ------------------------------------------------------------------------------------------------------
def _can_mount() -> bool:
    with tempfile.TemporaryDirectory() as d:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode:
            return False
        subprocess.run(["umount", d], check=True)
        return True


MOUNT = _can_mount()


class SmallDisk:
    """A tmpfs of its own at `place`, removed when the test ends."""

    def __init__(self, place: Path):
        place.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(place)], check=True)
        self.place = place

    def fill(self, room: int = ROOM) -> None:
        """Leave only `room` bytes free: what is written next, past those, fails with ENOSPC."""
        st = os.statvfs(self.place)
        with open(self.place / "ballast", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - room))

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.place)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.place)], check=True)


@pytest.fixture
def fault_place(tmp_path, inputs, monkeypatch):
    """make(fault, command) -> the place, prepared and faulted; undone (unmounted, limits lifted) afterwards."""
    undo = []

    def make(fault: str, command: Command) -> Path:
        place = tmp_path / "place"
        disk = None
        if fault in ("full", "read-only") and MOUNT:
            disk = SmallDisk(place)
            undo.append(disk.close)
        else:
            place.mkdir()
        for name in command.prepare:
            shutil.copytree(inputs[name], place / name)
        if fault == "full" and disk is not None:
            disk.fill()
        elif fault == "full":  # no mount: a file-size limit, which every writer meets as EFBIG
            old = resource.getrlimit(resource.RLIMIT_FSIZE)
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (ROOM, old[1]))
            undo.append(lambda: (resource.setrlimit(resource.RLIMIT_FSIZE, old),
                                 signal.signal(signal.SIGXFSZ, handler)))
        elif fault == "read-only" and disk is not None:
            disk.read_only()
        elif fault == "read-only":
            if os.geteuid() == 0:
                pytest.skip("root ignores permissions, and this process may not mount a read-only filesystem")
            for p in [place, *place.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            undo.append(lambda: [p.chmod(0o755) for p in [place, *place.rglob("*")] if p.is_dir()])
        elif fault == "under-a-file":
            (tmp_path / "file").write_text("x")
            place.rmdir()
            place = tmp_path / "file" / "place"
        elif fault == "removed":
            _remove_at_first_write(monkeypatch, place)
        return place

    yield make
    for step in reversed(undo):
        step()


def _remove_at_first_write(monkeypatch, place: Path) -> None:
    """The place is removed (by another process, say) just as loracls starts its first temporary file or folder
    there, wherever it is in the command."""
    real = tempfile
    removed = []

    class Tempfile:
        def __getattr__(self, name):
            return getattr(real, name)

        def _first(self, kwargs):
            folder = Path(kwargs.get("dir") or ".").absolute()
            if not removed and (folder == place or place in folder.parents):
                removed.append(folder)
                shutil.rmtree(place)

        def mkstemp(self, *args, **kwargs):
            self._first(kwargs)
            return real.mkstemp(*args, **kwargs)

        def mkdtemp(self, *args, **kwargs):
            self._first(kwargs)
            return real.mkdtemp(*args, **kwargs)

    monkeypatch.setattr(loracls.atomic, "tempfile", Tempfile())


CASES = [(c, f) for c in COMMANDS for f in ("full", "read-only", "removed")] + \
    [(c, "under-a-file") for c in NAMED_OUTPUT]


@pytest.mark.parametrize("name, fault", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_a_filesystem_fault_is_one_line_and_leaves_nothing_that_looks_complete(name, fault, inputs, fault_place,
                                                                                tmp_path):
    command = COMMANDS[name]
    place = fault_place(fault, command)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = command.args(place, inputs, elsewhere)
    code, err = run_cli(args)
    assert code == 2, err
    # one line says what failed, the last; the lines before are the command's usual notes (what data it read)
    assert "Traceback" not in "\n".join(err) and [line for line in err if "error" in line.lower()] == err[-1:], err
    assert err[-1].startswith(f"loracls {args[0]}: error: ")
    if place.is_dir():
        assert not command.looks_complete(place), sorted(p.name for p in place.rglob("*"))
        if fault != "read-only":
            assert not [p for p in place.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("fault, words", [("full", "space"), ("read-only", "read-only"), ("removed", "removed")])
def test_the_message_names_the_fault(fault, words, inputs, fault_place):
    if not MOUNT and fault != "removed":
        pytest.skip("without a mount, the faults are their unprivileged cousins (EFBIG, EACCES)")
    command = COMMANDS["export transformers"]
    code, err = run_cli(command.args(fault_place(fault, command), inputs, None))
    assert code == 2 and words in err[-1], err


@pytest.mark.skipif(not MOUNT, reason="needs to mount a small filesystem to fill (root)")
def test_the_libraries_wrapped_disk_errors_are_recognized(tmp_path):
    """What safetensors, tokenizers, SQLite and PyTorch's zip writer raise on a real full disk is words only, no
    OSError; each is still the machine's fault.  A bug stays a bug."""
    import sqlite3

    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    disk = SmallDisk(tmp_path / "disk")
    try:
        disk.fill(room=0)
        caught = []
        for write in (lambda: save_file({"w": torch.zeros(10000)}, disk.place / "a"),
                      lambda: Tokenizer(models.WordLevel({f"w{i}": i for i in range(2000)}, unk_token="w0")).save(
                          str(disk.place / "b")),
                      lambda: torch.save({"w": torch.zeros(10000)}, disk.place / "c"),
                      lambda: sqlite3.connect(disk.place / "d.db").execute("create table t(x)")):
            with pytest.raises(Exception) as e:
                write()
            caught.append(e.value)
    finally:
        disk.close()
    assert not any(isinstance(e, OSError) for e in caught), caught
    for e in caught:
        message = machine_error_message(e)
        assert message and ("space" in message or "disk is full" in message), (e, message)
    assert machine_error_message(ValueError("shape mismatch")) is None
    assert machine_error_message(OSError(errno.EINVAL, "Invalid argument")) is None
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))
    assert "read-only" in machine_error_message(wrapped) and str(tmp_path / "x") in machine_error_message(wrapped)
