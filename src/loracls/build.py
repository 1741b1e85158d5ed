"""One way to build a model: for a fresh run, for a resumed one, and for a saved run (evaluate, predict, export).

    base_model(...)   the model folder (local or from the hub), its config.json and its tokenizer, checked
    check_fits(...)   the run's settings against that model (max length, rank, layers; what method full ignores)
    classifier(...)   the backend's LoRA classifier, head and LoRA A drawn from the seed (method full: the
                      whole model trained, transformers' own starting weights, by either backend)
    load_run(...)     a saved run: the three above plus the best adapter, merged for inference

Every caller goes through these, so a model trained, resumed and reloaded is built the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracls import peft_format
from loracls.backends import Backend, Classifier, select_backend
from loracls.config import LoraSettings, RunConfig
from loracls.data import Labels
from loracls.errors import LoraclsError
from loracls.families import max_positions
from loracls.models import (check_max_length, load_tokenizer, read_model_config, resolve_model_dir,
                            settle_padding)
from loracls.planning import check_lora_fits
from loracls.rundir import RunDir
from loracls.tasks import task_of


def use_threads(n: int | None) -> None:
    """PyTorch's CPU threads for this process; None keeps its default (one per core)."""
    if n is not None:
        torch.set_num_threads(n)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraclsError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class BaseModel:
    """A pretrained encoder on disk: its folder, its config.json (a transformers PretrainedConfig) and tokenizer."""

    model_dir: str
    config: Any
    tokenizer: Any


def base_model(model: str, *, trust_remote_code: bool = False, run: RunDir | None = None) -> BaseModel:
    """Resolve `model` (a folder, or a hub id fetched once) and read its config and tokenizer.  For a saved run,
    a base model that has moved since training is named as such."""
    p = Path(model)
    if run is not None and p.is_absolute() and not p.exists():
        raise LoraclsError(f"the base model of run {str(run.path)!r}, {model!r}, no longer exists (moved or "
                           f"deleted); put it back, or set 'model:' in {run.path / 'config.yaml'} to its new folder")
    model_dir = resolve_model_dir(model)
    model_config = read_model_config(model_dir, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code, getattr(model_config, "vocab_size", None))
    settle_padding(model_config, tokenizer, model_dir)
    return BaseModel(model_dir, model_config, tokenizer)


def check_fits(config: RunConfig, base: BaseModel) -> None:
    """The run's settings against the model: max length, ranks and layer indices; and under method full, no recipe
    setting that only LoRA has."""
    limit = max_positions(base.config)
    if config.data.max_length > limit:
        raise LoraclsError(f"max length {config.data.max_length} exceeds the model's {limit} positions; "
                           f"pass --max-length {limit} or less")
    check_max_length(base.tokenizer, config.data.max_length)
    check_lora_fits(base.config, config.lora)
    if config.lora.full:
        _check_no_lora_recipe(config)


def _check_no_lora_recipe(config: RunConfig) -> None:
    """A full fine-tune gives every parameter the head's optimizer group (none holds 'lora_'), so LoRA+ and the
    classifier warm-up, which set LoRA's groups apart, would silently do nothing: refuse them."""
    t = config.train
    if t.lora_plus_ratio != 1:
        raise LoraclsError(f"train.lora_plus_ratio {t.lora_plus_ratio:g} speeds up LoRA's B matrices, and --method "
                           "full has none; drop --lora-plus-ratio")
    if t.head_warmup_ratio > 0:
        raise LoraclsError(f"train.head_warmup_ratio {t.head_warmup_ratio:g} trains the head before LoRA, and "
                           "--method full trains every parameter from the first step; drop --head-warmup-ratio")


@dataclass
class Built:
    """A fresh LoRA classifier, the backend that built it, and a line saying why that backend (for `auto`)."""

    backend: Backend
    model: Classifier
    note: str


def classifier(base: BaseModel, num_labels: int, lora: LoraSettings, *, backend: str, device: torch.device,
               seed: int, precision: str, trust_remote_code: bool = False) -> Built:
    """A fresh LoRA classifier of the chosen backend in `precision` (auto, fp32, bf16; the backend resolves
    auto for the device): head and LoRA A drawn from `seed`, B zero."""
    chosen, note = select_backend(backend, base.config, lora)
    resolved, why = chosen.precision(precision, device)
    torch.manual_seed(seed)
    random.seed(seed)
    model = chosen.build(base.model_dir, base.config, num_labels, lora, device, seed=seed,
                         trust_remote_code=trust_remote_code, precision=resolved)
    return Built(chosen, model, f"{note} | precision {resolved} ({why})")


@dataclass
class LoadedRun:
    """A finished run, ready for inference: its config, label mapping, tokenizer and merged model."""

    run: RunDir
    config: RunConfig
    label_map: Labels
    tokenizer: Any
    model: Classifier
    backend: str

    @property
    def labels(self) -> list[str]:
        return self.label_map.names


def saved_shape(config: RunConfig, base: BaseModel, num_labels: int, backend: str, device,
                precision: str | None = None) -> Built:
    """A classifier shaped like the run's saved adapter, ready for its weights: PiSSA trains a residual base and
    saves the equivalent plain LoRA for the original one (peft_format.saved_settings).  `precision` None: the
    run's own setting."""
    return classifier(base, num_labels, peft_format.saved_settings(config.lora), backend=backend, device=device,
                      seed=config.train.seed, precision=precision or config.precision,
                      trust_remote_code=config.trust_remote_code)


def load_run(path: str | Path, *, backend: str = "auto", device: str = "auto", merge: bool = True,
             precision: str | None = None) -> LoadedRun:
    """Open a run directory and rebuild its best model with `backend` (any backend reads any run), in `precision`
    (None: the run's setting, resolved on this machine)."""
    run = RunDir.open(path)
    run.require_model()
    config = run.read_config()
    labels = Labels(run.read_labels(), run.read_label_values())
    base = base_model(config.model, trust_remote_code=config.trust_remote_code, run=run)
    built = saved_shape(config, base, task_of(config).outputs(len(labels)), backend, pick_device(device), precision)
    model = built.model
    _, state = peft_format.read_adapter(run.adapter)
    model.load_adapter_state_dict(state)
    if merge:
        model.merge()
    model.eval()
    return LoadedRun(run, config, labels, base.tokenizer, model, built.backend.name)
