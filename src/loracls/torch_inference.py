"""Inference with a PyTorch backend: the task's outputs for tokenized examples, and the run predictor that
`loracls predict`, `loracls evaluate` and `loracls.load()` use for the fast and peft backends."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from loracls.backends import Classifier
from loracls.build import LoadedRun, load_run
from loracls.models import tokenize
from loracls.tasks import Task, run_task


@torch.inference_mode()
def predict_outputs(model: Classifier, task: Task, token_ids: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
    """The task's outputs (class probabilities for single-label) [N, num_labels], float32, in input order
    (batches may run in any order)."""
    was_training = model.training
    model.eval()
    out = torch.empty((len(token_ids), model.num_labels), dtype=torch.float32)
    pending = []  # keep results on the device until the end: no host sync per batch
    lengths = [len(t) for t in token_ids]
    for idx in model.eval_batches(lengths, batch_size):
        logits = model(model.collate([token_ids[i] for i in idx]))
        pending.append((idx, task.activate(logits)))
    for idx, outputs in pending:
        out[torch.as_tensor(idx)] = outputs.float().cpu()
    model.train(was_training)
    return out.numpy()


class TorchPredictor:
    """A saved run on the fast or peft backend (a loracls.predictor.Predictor): texts in, the task's outputs out."""

    def __init__(self, loaded: LoadedRun, batch_size: int | None = None):
        self.loaded = loaded
        self.run_dir, self.config, self.label_map = loaded.run.path, loaded.config, loaded.label_map
        self.backend = loaded.backend
        self.batch_size = batch_size or loaded.config.train.eval_batch_size
        self.task = run_task(loaded.run, loaded.config, loaded.label_map.names)

    @classmethod
    def open(cls, run_dir, *, backend: str = "auto", device: str = "auto", batch_size: int | None = None,
             precision: str | None = None):
        return cls(load_run(run_dir, backend=backend, device=device, precision=precision), batch_size)

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        return tokenize(self.loaded.tokenizer, texts, self.config.data.max_length)

    def outputs(self, token_ids: list[list[int]]) -> np.ndarray:
        return predict_outputs(self.loaded.model, self.task, token_ids, self.batch_size)
