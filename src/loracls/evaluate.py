"""Inference over tokenized examples, metrics on labelled data, and loading a finished run for inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loracls.backends import Classifier, select_backend
from loracls.config import RunConfig
from loracls.errors import LoraclsError
from loracls.metrics import classification_metrics
from loracls.models import load_tokenizer, resolve_model_dir
from loracls.rundir import RunDir


@torch.inference_mode()
def predict_probs(model: Classifier, token_ids: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
    """Class probabilities [N, num_labels], float32, in input order (batches may run in any order)."""
    was_training = model.training
    model.eval()
    out = torch.empty((len(token_ids), model.num_labels), dtype=torch.float32)
    pending = []  # keep results on the device until the end: no host sync per batch
    lengths = [len(t) for t in token_ids]
    for idx in model.eval_batches(lengths, batch_size):
        logits = model(model.collate([token_ids[i] for i in idx]))
        pending.append((idx, torch.softmax(logits, dim=-1)))
    for idx, probs in pending:
        out[torch.as_tensor(idx)] = probs.float().cpu()
    model.train(was_training)
    return out.numpy()


def evaluate_probs(probs: np.ndarray, labels: Sequence[int], label_names: list[str]) -> dict:
    """Classification metrics plus the mean cross-entropy of the given probabilities."""
    metrics = classification_metrics(list(labels), probs.argmax(axis=1).tolist(), label_names)
    p = torch.as_tensor(probs).clamp_min(1e-12)
    metrics["loss"] = float(F.nll_loss(p.log(), torch.as_tensor(list(labels), dtype=torch.long)))
    return metrics


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraclsError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LoadedRun:
    """A finished run, ready for inference: its config, class names, tokenizer and merged model."""

    run: RunDir
    config: RunConfig
    labels: list[str]
    tokenizer: object
    model: Classifier


def load_run(path: str, *, backend: str = "auto", device: str = "auto", merge: bool = True) -> LoadedRun:
    """Open a run directory and rebuild its best model with `backend` (any backend reads any run)."""
    from loracls import peft_format
    from loracls.plan import read_model_config

    run = RunDir.open(path)
    run.require_model()
    config = run.read_config()
    labels = run.read_labels()
    model_dir = resolve_model_dir(config.model)
    model_config = read_model_config(model_dir, trust_remote_code=config.trust_remote_code)
    chosen = select_backend(backend, model_config, config.lora)
    model = chosen.build(model_dir, len(labels), config.lora, pick_device(device), seed=config.train.seed,
                         trust_remote_code=config.trust_remote_code)
    _, state = peft_format.read_adapter(run.adapter)
    model.load_adapter_state_dict(state)
    if merge:
        model.merge()
    model.eval()
    return LoadedRun(run, config, labels, load_tokenizer(model_dir, config.trust_remote_code), model)
