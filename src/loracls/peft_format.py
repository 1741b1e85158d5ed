"""PEFT's adapter file format, written and read in one place.

A run's `adapter/` folder is exactly what `peft.PeftModel.from_pretrained(base, folder)` reads:
`adapter_config.json` plus `adapter_model.safetensors`.  Tensor names follow PEFT's saved form, e.g.
`base_model.model.roberta.encoder.layer.3.attention.self.value.lora_B.weight`, and the trainable head is saved
through `modules_to_save` as `base_model.model.classifier.<...>`.

Why a regex for target_modules: PEFT matches a list entry as a module-name *suffix*, so "output.dense" would also
hit "attention.output.dense", and a list cannot restrict layers and module types together.  A regex string is
matched in full against each module name, which says exactly what was adapted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loracls.config import LoraSettings
from loracls.errors import LoraclsError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Module paths inside one encoder layer, per canonical target name (see config.TARGET_CHOICES).
TARGET_MODULE_PATHS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}


def target_regex(lora: LoraSettings) -> str:
    """A regex that full-matches the names of exactly the adapted encoder linears."""
    layers = r"\d+" if lora.layers is None else "(?:" + "|".join(str(i) for i in lora.layers) + ")"
    paths = "|".join(re.escape(TARGET_MODULE_PATHS[t]) for t in lora.targets)
    return rf".*\.encoder\.layer\.{layers}\.(?:{paths})"


def adapted_module_names(module_names: list[str], lora: LoraSettings) -> list[str]:
    """The names among `module_names` that `target_regex` selects (PEFT uses re.fullmatch)."""
    pattern = re.compile(target_regex(lora))
    return [n for n in module_names if pattern.fullmatch(n)]


def modules_to_save(lora: LoraSettings) -> list[str]:
    """Head modules that are trained in full and saved with the adapter."""
    return ["classifier"]


def adapter_config(lora: LoraSettings, *, base_model: str, save_modules: list[str] | None = None) -> dict:
    """The adapter_config.json contents PEFT needs to rebuild the same LoRA model."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": target_regex(lora),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": save_modules if save_modules is not None else modules_to_save(lora),
        "inference_mode": True,
    }


def write_adapter(folder: str | Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write an adapter folder.  Each file is written under a temporary name and renamed into place."""
    from loracls.rundir import atomic_write_bytes, atomic_write_text  # late: rundir imports this module

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, _safetensors_bytes(tensors))


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read adapter_config.json and the weights; a missing or corrupt file is a LoraclsError."""
    folder = Path(folder)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise LoraclsError(f"{p} is missing; the run has no complete adapter (train it, or --resume it)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LoraclsError(f"{cfg_path} is corrupt (not valid JSON); retrain or restore the run") from None
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraclsError(f"{w_path} is corrupt or truncated ({str(e).splitlines()[0][:80]}); "
                           "retrain or restore the run") from None
    return config, state


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TARGET_MODULE_PATHS", "target_regex", "adapted_module_names",
           "modules_to_save", "adapter_config", "write_adapter", "read_adapter"]
