"""The run directory: a folder that describes itself, written so that a kill at any instant leaves it consistent.

Layout (see README); this module owns every file name in it:
    run.json                status (running / completed / interrupted / failed), versions, backend, timestamps
    config.yaml             the resolved RunConfig
    labels.json             class names, index = label id
    label_values.json       the label value each class had in the training data ("1" for AG News' World), so
                            every later file's labels map the same way
    adapter/                best epoch's adapter in PEFT's format (adapter_config.json + adapter_model.safetensors);
                            a full fine-tune (--method full) keeps its whole model there instead, in transformers'
                            format (config.json + model.safetensors)
    checkpoint/state.pt     last resumable training state (trainables, optimizer, scheduler, RNGs, data position)
    history.jsonl           loss and lr every log_every steps, validation metrics after each epoch
    metrics.json            final metrics
    report.md, confusion_matrix.png, training_curves.png

Every file is written atomically (loracls.atomic).  One process at a time writes a run: `RunLock` holds an
exclusive lock (flock) on `.loracls-lock` inside it while train or resume runs, and a second writer is refused
with the holder's pid, host and start time.  The lock file goes away with the writer; the kernel releases the
lock itself if the writer dies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracls.atomic import atomic_write_json, atomic_write_text, remove_stale_temporaries
from loracls.errors import LoraclsError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

# Bumped when the run-directory layout changes in a way older readers would misread.
RUN_FORMAT_VERSION = 1

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
LABELS_JSON = "labels.json"
LABEL_VALUES_JSON = "label_values.json"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A full fine-tune (method full) saves every weight where LoRA saves its adapter, as a transformers model folder
# (no tokenizer): its config.json and model.safetensors, under transformers' own tensor names.
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
SCATTER_PNG = "predicted_vs_true.png"  # a regression run's figure, where a classifier has its confusion matrix
PER_LABEL_PNG = "per_label_f1.png"  # a multi-label run's figure: a confusion matrix means nothing there
THRESHOLDS_JSON = "thresholds.json"  # a multi-label run's decision threshold per label, tuned on validation
TEACHER_OUTPUTS = "teacher_outputs.npz"  # a student's teachers' outputs on its texts, and where they came from
TENSORBOARD_DIR = "tensorboard"
ONNX_DIR = "onnx"  # the run served by ONNX Runtime (loracls.onnx_inference), made on first use
LOCK = ".loracls-lock"

# What loracls writes into a run directory: `--overwrite` removes these and nothing else.
RUN_FILES = (RUN_JSON, CONFIG_YAML, LABELS_JSON, LABEL_VALUES_JSON, HISTORY, METRICS, REPORT, CONFUSION_PNG,
             SCATTER_PNG, PER_LABEL_PNG, THRESHOLDS_JSON, TEACHER_OUTPUTS, CURVES_PNG, f".{ONNX_DIR}.lock", f".{ONNX_DIR}-int8.lock")
RUN_FOLDERS = (ADAPTER_DIR, CHECKPOINT_DIR, TENSORBOARD_DIR, ONNX_DIR, f"{ONNX_DIR}-int8")

STATUSES = ("running", "completed", "interrupted", "failed")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def onnx_dir(run: Path, quantize: str | None) -> Path:
    """Where a run keeps its ONNX export for serving: onnx/ (fp32) or onnx-int8/."""
    return Path(run) / (ONNX_DIR if quantize is None else f"{ONNX_DIR}-{quantize}")


# Folder names that say nothing of the model: a checkpoint, a hub cache's snapshot hash, "model", "final".
_GENERIC_NAME = re.compile(r"(models?|checkpoints?|ckpts?|snapshots?|final|best|latest|last|main|outputs?|weights|"
                           r"hf|pretrained|merged|exports?|saved|(checkpoint|ckpt|step|epoch|global_step)[-_]?\d+|"
                           r"[0-9a-f]{7,}|\d+)", re.IGNORECASE)


def model_name(model: str) -> str:
    """A model's own name, for run folders and plot titles: a hub id's last part ("FacebookAI/roberta-base" ->
    "roberta-base"), a local folder's name, or, when that name is generic ("model", "checkpoint-500", a snapshot
    hash, "final"), the nearest meaningful folder above it (a hub cache's "models--org--name" gives "name")."""
    parts = [part for part in Path(os.path.normpath(str(model))).parts if part not in ("", os.sep, ".", "..")]
    for part in reversed(parts):
        if part.startswith("models--"):  # huggingface_hub's cache: models--{org}--{name}/snapshots/{hash}
            return part.split("--")[-1]
        if not _GENERIC_NAME.fullmatch(part):
            return part
    return parts[-1] if parts else "model"


def absolute_path(path: str | Path) -> Path:
    """`path` made absolute, with `~`, `.` and `..` resolved as text (symlinks are kept: they may be the user's
    way of naming a model or a data file), as loracls stores and prints every path."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def check_creatable(path: Path, what: str, flag: str) -> None:
    """Refuse a path that is a file, or lies under one (mkdir would fail with a traceback)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under {str(p)!r}, which is a file"
                raise LoraclsError(f"{what} {str(path)!r} {where}; choose a folder path with {flag}")
            return


class RunLock:
    """An exclusive, non-blocking lock on a run directory, released by `release()` or by the process's death."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd: int | None = None

    def acquire(self, command: str) -> "RunLock":
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise LoraclsError(f"run directory {str(self.path.parent)!r} is in use by another loracls process "
                                   f"({self._holder()}); wait for it to end, or choose another --output-dir") from None
            try:  # the file we locked must still be the one at the path (a releasing holder unlinks it)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": now()}).encode())
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']}, `loracls {h['command']}` since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._still_ours():  # not when the folder was removed and another writer made its own lock there
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False


@dataclass
class RunDir:
    """Paths and small read/write helpers for one run directory."""

    path: Path
    lock: RunLock | None = field(default=None, repr=False)
    info: dict = field(default_factory=dict, repr=False)
    """run.json as open() read it (under the lock, when it took one)."""

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR / CHECKPOINT_FILE

    def file(self, name: str) -> Path:
        return self.path / name

    # -- creating and opening ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool) -> "RunDir":
        """A fresh run directory, locked for this process.  An existing run is refused unless overwrite (and
        then only loracls' own files are removed); a folder holding other files is refused."""
        path = absolute_path(path)
        check_creatable(path, "output folder", "--output-dir")
        made = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        lock = RunLock(path).acquire("train")
        try:
            remove_stale_temporaries(path)
            others = [p.name for p in path.iterdir() if p.name != LOCK]
            if others:
                holds_run = (path / RUN_JSON).exists() or (path / CONFIG_YAML).exists()
                if not holds_run:
                    raise LoraclsError(f"output folder {str(path)!r} is not empty and holds no run (it has "
                                       f"{others[0]!r}); choose an empty or new folder with --output-dir")
                if not overwrite:
                    raise LoraclsError(f"output folder {str(path)!r} already holds a run; pass --overwrite to "
                                       f"replace it, --resume {path} to continue it, or choose another --output-dir")
                _remove_run_files(path)
            (path / CHECKPOINT_DIR).mkdir(exist_ok=True)
            run = cls(path, lock)
            run.write_info(status="running", created_at=now())  # from here on the folder holds a run
        except BaseException:
            if made:  # we made it: leave nothing behind, removed while still locked so no other train moves in
                shutil.rmtree(path, ignore_errors=True)
            lock.release()
            raise
        return run

    @classmethod
    def open(cls, path: str | Path, *, lock_for: str | None = None) -> "RunDir":
        """An existing run directory, checked for format compatibility; locked for writing when `lock_for`
        names the command (resume)."""
        path = Path(path)
        if not path.is_dir():
            what = "is a file, not a run directory" if path.exists() else "does not exist"
            raise LoraclsError(f"run directory {str(path)!r} {what}; pass the folder `loracls train` printed")
        run = cls(absolute_path(path))
        if lock_for is not None and (run.path / RUN_JSON).is_file():  # lock only a run, and before reading it
            run.lock = RunLock(run.path).acquire(lock_for)
        try:
            if run.lock is not None:
                remove_stale_temporaries(run.path)  # a killed run's half-written files, before they pile up
            run.info = run.read_info()
            version = run.info.get("format_version")
            if version != RUN_FORMAT_VERSION:
                raise LoraclsError(f"run directory {str(path)!r} has format version {version!r} but this loracls "
                                   f"reads version {RUN_FORMAT_VERSION}; use the loracls version that wrote it or "
                                   "retrain")
        except BaseException:
            run.release()
            raise
        return run

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- run.json -----------------------------------------------------------------------------------------------
    def read_info(self) -> dict:
        p = self.path / RUN_JSON
        if not p.is_file():
            raise LoraclsError(f"folder {str(self.path)!r} holds no loracls run (it has no {RUN_JSON}); "
                               "pass the run directory `loracls train` printed")
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoraclsError(f"{p} is corrupt; the run directory was damaged, retrain it") from None
        if not isinstance(info, dict):
            raise LoraclsError(f"{p} is corrupt; the run directory was damaged, retrain it")
        return info

    def write_info(self, **fields: Any) -> dict:
        """Update run.json with `fields` (status, backend, ...) and an updated_at timestamp."""
        try:
            info = self.read_info()
        except LoraclsError:
            info = {}
        from loracls._version import __version__

        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"bad status {fields['status']!r}")
        info.update(fields)
        info.update(format_version=RUN_FORMAT_VERSION, loracls_version=__version__, updated_at=now())
        atomic_write_json(self.path / RUN_JSON, info)
        return info

    def mark_ended(self, status: str, **fields: Any) -> None:
        """Best effort, on the way out of a failure: the disk may be full, and the original error matters more."""
        try:
            self.write_info(status=status, **fields)
        except (OSError, LoraclsError):
            pass

    # -- contents ----------------------------------------------------------------------------------------------
    def _read_json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraclsError(f"{p} is missing; the run directory is incomplete, retrain it") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoraclsError(f"{p} is corrupt; the run directory was damaged, retrain it") from None

    def write_labels(self, names: list[str], values: list[str] | None) -> None:
        atomic_write_json(self.path / LABELS_JSON, names)
        if values is not None:
            atomic_write_json(self.path / LABEL_VALUES_JSON, values)

    def read_labels(self) -> list[str]:
        labels = self._read_json(LABELS_JSON)
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise LoraclsError(f"{self.path / LABELS_JSON} is corrupt (expected a list of class names); retrain")
        return labels

    def read_label_values(self) -> list[str] | None:
        """The training data's label value of each class; None for runs written before loracls stored them."""
        if not (self.path / LABEL_VALUES_JSON).is_file():
            return None
        values = self._read_json(LABEL_VALUES_JSON)
        if not isinstance(values, list) or not all(isinstance(x, str) for x in values):
            raise LoraclsError(f"{self.path / LABEL_VALUES_JSON} is corrupt (expected a list of strings); retrain")
        return values

    def read_thresholds(self) -> dict | None:
        """A multi-label run's {label: threshold} as stored (checked by its task); None where there is none."""
        if not (self.path / THRESHOLDS_JSON).is_file():
            return None
        return self._read_json(THRESHOLDS_JSON)

    def read_config(self):
        from loracls.config import load_config

        p = self.path / CONFIG_YAML
        if not p.is_file():
            raise LoraclsError(f"{p} is missing; the run directory is incomplete, retrain it")
        return load_config(p)

    def has_model(self) -> bool:
        """Whether the best epoch's weights are saved: an adapter, or a full fine-tune's whole model."""
        return any((self.adapter / c).is_file() and (self.adapter / w).is_file()
                   for c, w in ((ADAPTER_CONFIG, ADAPTER_WEIGHTS), (MODEL_CONFIG, MODEL_WEIGHTS)))

    def require_model(self) -> None:
        """Refuse a run that never saved a model, saying why."""
        if self.has_model():
            return
        status = self.read_info().get("status", "unknown")
        raise LoraclsError(f"run {str(self.path)!r} has no complete model (status: {status}; no epoch finished); "
                           f"resume it with `loracls train --resume {self.path}` or retrain")

    def write_history(self, records: list[dict]) -> None:
        """history.jsonl is rewritten whole (it is small), so it always matches the checkpoint it belongs to."""
        atomic_write_text(self.path / HISTORY, "".join(json.dumps(r) + "\n" for r in records))

    def read_history(self) -> list[dict]:
        p = self.path / HISTORY
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _remove_run_files(path: Path) -> None:
    """Delete what a previous run wrote (only loracls' own names), for --overwrite."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(path / name, ignore_errors=True)
