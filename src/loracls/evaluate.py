"""Inference over tokenized examples, and metrics of a model on labelled data."""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loracls.backends import Classifier
from loracls.build import LoadedRun
from loracls.data import read_examples
from loracls.metrics import classification_metrics
from loracls.models import tokenize


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


def read_for_run(loaded: LoadedRun, source: str, *, require_labels: bool, max_samples: int | None = None,
                 allow_pickle: bool = False, text_columns: list[str] | None = None, label_column: str | None = None,
                 keep_empty: bool = False):
    """Read `source` with the run's columns (or the given ones) and label mapping, and tokenize it like training
    did.  Returns (examples, token ids, number truncated)."""
    d = loaded.config.data
    examples, _ = read_examples(source, text_columns=text_columns or d.text_columns,
                                label_column=label_column or d.label_column, labels=loaded.label_map,
                                require_labels=require_labels, allow_pickle=allow_pickle, default_split="test",
                                keep_empty=keep_empty)
    if max_samples is not None and len(examples) > max_samples:
        examples = examples.subset(list(range(max_samples)))
    if examples.skipped_empty:
        print(f"loracls: skipped {examples.skipped_empty} rows with empty text", file=sys.stderr)
    token_ids, truncated = tokenize(loaded.tokenizer, examples.texts, d.max_length)
    return examples, token_ids, truncated


def evaluate_run(loaded: LoadedRun, source: str, *, max_samples: int | None = None, allow_pickle: bool = False,
                 batch_size: int | None = None, text_columns: list[str] | None = None,
                 label_column: str | None = None) -> dict:
    """Metrics of a loaded run on labelled data (its labels mapped as the run's training data mapped them)."""
    examples, token_ids, truncated = read_for_run(loaded, source, require_labels=True, max_samples=max_samples,
                                                  allow_pickle=allow_pickle, text_columns=text_columns,
                                                  label_column=label_column)
    probs = predict_probs(loaded.model, token_ids, batch_size or loaded.config.train.eval_batch_size)
    metrics = evaluate_probs(probs, examples.labels, loaded.labels)
    metrics["truncated"] = truncated
    metrics["skipped_empty"] = examples.skipped_empty
    return metrics
