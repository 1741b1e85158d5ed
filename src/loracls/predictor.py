"""The one interface to a finished run, whatever runs it, and the one way to open it.

A `Predictor` is a saved run ready for inference.  The PyTorch backends (torch_inference.TorchPredictor: fast,
peft) and ONNX Runtime (onnx_inference.OnnxPredictor: onnx, onnx-int8) implement it; `loracls predict`,
`loracls evaluate`, `loracls serve` and the Python API (`loracls.load`) use nothing else.  It imports no torch, so
ONNX serving starts without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from loracls.config import BACKEND_CHOICES, RunConfig
from loracls.data import Labels
from loracls.errors import LoraclsError
from loracls.onnx_inference import ONNX_BACKENDS
from loracls.tasks import Task

INFERENCE_BACKENDS = (*BACKEND_CHOICES, *ONNX_BACKENDS)


class Predictor(Protocol):
    """Texts in, the task's outputs out, tokenized exactly as training tokenized them."""

    run_dir: Path
    config: RunConfig
    """The run's resolved config (its columns, max length, label rule)."""
    label_map: Labels
    """The run's classes, and the values its training data wrote them as."""
    task: Task
    backend: str
    """What runs it: fast, peft, onnx or onnx-int8 (`auto` resolved)."""
    batch_size: int

    def tokenize(self, texts: list) -> tuple[list[list[int]], int]:
        """Token ids per text or (text, text) pair, special tokens included, cut to the run's max length; and
        how many were cut."""

    def outputs(self, token_ids: list[list[int]]) -> np.ndarray:
        """The task's outputs [N, width], float32, in input order (class probabilities for single-label)."""


def open_predictor(run_dir, *, backend: str = "auto", device: str = "auto", batch_size: int | None = None,
                   threads: int | None = None, precision: str | None = None) -> Predictor:
    """A saved run ready for inference with `backend` (any backend reads any run); `precision` applies to the
    torch backends (None: the run's setting)."""
    if backend not in INFERENCE_BACKENDS:
        raise LoraclsError(f"unknown backend {backend!r}; choose {', '.join(INFERENCE_BACKENDS)}")
    if backend in ONNX_BACKENDS:
        from loracls.onnx_inference import OnnxPredictor

        return OnnxPredictor(run_dir, backend=backend, batch_size=batch_size, threads=threads)
    from loracls.build import use_threads
    from loracls.torch_inference import TorchPredictor

    use_threads(threads)
    if under_torchrun():
        from loracls.distributed import world

        device = world().device(device)
    return TorchPredictor.open(run_dir, backend=backend, device=device, batch_size=batch_size, precision=precision)


# These two read torchrun's environment rather than loracls.distributed.world(), which imports torch: ONNX
# serving must start without it.  world() checks the same variables when a job actually joins.
def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


__all__ = ["INFERENCE_BACKENDS", "Predictor", "is_main", "open_predictor", "under_torchrun"]
