"""The run directory: a folder that describes itself, written so that a kill at any instant leaves it consistent.

Layout (see README):
    run.json                status (running / completed / interrupted / failed), versions, backend, timestamps
    config.yaml             the resolved RunConfig
    labels.json             class names, index = label id
    adapter/                best epoch's adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)
    checkpoint/state.pt     last resumable training state (trainables, optimizer, scheduler, RNGs, data position)
    history.jsonl           loss and lr every log_every steps, validation metrics after each epoch
    metrics.json            final metrics
    report.md, confusion_matrix.png, training_curves.png

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed over the old one;
rename is atomic on POSIX, so a reader sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracls.errors import LoraclsError

# Bumped when the run-directory layout changes in a way older readers would misread.
RUN_FORMAT_VERSION = 1

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
LABELS_JSON = "labels.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"

STATUSES = ("running", "completed", "interrupted", "failed")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@dataclass
class RunDir:
    """Paths and small read/write helpers for one run directory."""

    path: Path

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
        """A fresh run directory.  An existing run is refused unless overwrite; other files are never touched."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LoraclsError(f"output path {str(path)!r} is a file; choose a folder with --output-dir")
        if path.is_dir() and any(path.iterdir()):
            holds_run = (path / RUN_JSON).exists() or (path / CONFIG_YAML).exists()
            if not holds_run:
                raise LoraclsError(f"output folder {str(path)!r} is not empty and holds no run; "
                                   "choose an empty or new folder with --output-dir")
            if not overwrite:
                raise LoraclsError(f"output folder {str(path)!r} already holds a run; pass --overwrite to replace it, "
                                   f"--resume {path} to continue it, or choose another --output-dir")
            _remove_run_files(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CHECKPOINT_DIR).mkdir(exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory, checked for format compatibility."""
        path = Path(path)
        if not path.is_dir():
            raise LoraclsError(f"run directory {str(path)!r} does not exist; pass the folder `loracls train` printed")
        run = cls(path)
        info = run.read_info()
        version = info.get("format_version")
        if version != RUN_FORMAT_VERSION:
            raise LoraclsError(f"run directory {str(path)!r} has format version {version!r} but this loracls reads "
                               f"version {RUN_FORMAT_VERSION}; use the loracls version that wrote it or retrain")
        return run

    # -- run.json -----------------------------------------------------------------------------------------------
    def read_info(self) -> dict:
        p = self.path / RUN_JSON
        if not p.is_file():
            raise LoraclsError(f"{str(self.path)!r} is not a loracls run directory (no {RUN_JSON}); "
                               "pass the folder `loracls train` printed")
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
        from loracls import __version__

        info.update(fields)
        info.update(format_version=RUN_FORMAT_VERSION, loracls_version=__version__,
                    updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"bad status {fields['status']!r}")
        atomic_write_json(self.path / RUN_JSON, info)
        return info

    # -- contents ----------------------------------------------------------------------------------------------
    def read_labels(self) -> list[str]:
        p = self.path / LABELS_JSON
        try:
            labels = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraclsError(f"{p} is missing; the run directory is incomplete, retrain it") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoraclsError(f"{p} is corrupt; the run directory was damaged, retrain it") from None
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise LoraclsError(f"{p} is corrupt (expected a list of class names); retrain the run")
        return labels

    def read_config(self):
        from loracls.config import load_config

        p = self.path / CONFIG_YAML
        if not p.is_file():
            raise LoraclsError(f"{p} is missing; the run directory is incomplete, retrain it")
        return load_config(p)

    def has_model(self) -> bool:
        from loracls.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

        return (self.adapter / ADAPTER_CONFIG).is_file() and (self.adapter / ADAPTER_WEIGHTS).is_file()

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
    import shutil

    for name in (RUN_JSON, CONFIG_YAML, LABELS_JSON, HISTORY, METRICS, REPORT, CONFUSION_PNG, CURVES_PNG):
        (path / name).unlink(missing_ok=True)
    for name in (ADAPTER_DIR, CHECKPOINT_DIR):
        shutil.rmtree(path / name, ignore_errors=True)
