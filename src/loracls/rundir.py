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
