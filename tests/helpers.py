"""Helpers the tests share: build a model the way loracls does, and save its adapter in PEFT's format."""

from __future__ import annotations

from pathlib import Path

import torch

from loracls import peft_format
from loracls.backends import select_backend
from loracls.config import LoraSettings
from loracls.planning import read_model_config

CPU = torch.device("cpu")


def build_model(model_dir, backend: str = "peft", lora: LoraSettings | None = None, seed: int = 0,
                num_labels: int = 4, policy=None):
    """A backend's fresh classifier for the model folder, built as `loracls train` builds it."""
    lora = lora or LoraSettings(rank=4, alpha=16, dropout=0.1)
    cfg = read_model_config(str(model_dir))
    chosen, _ = select_backend(backend, cfg, lora)
    assert chosen.name == backend
    extra = {"policy": policy} if policy is not None else {}
    return chosen.build(str(model_dir), cfg, num_labels, lora, CPU, seed=seed, **extra)


def save_adapter(model, lora: LoraSettings, folder: Path, base_model: str = "x") -> None:
    peft_format.write_adapter(folder, peft_format.adapter_config(lora, model.layout, base_model=str(base_model)),
                              model.adapter_state_dict())
