"""PEFT's adapter format, in memory and on disk, in one place.

A run's `adapter/` folder is exactly what `peft.PeftModel.from_pretrained(base, folder)` reads:
`adapter_config.json` plus `adapter_model.safetensors`.  Tensor names follow PEFT's saved form, e.g.
`base_model.model.roberta.encoder.layer.3.attention.self.value.lora_B.weight`, and the trainable head is saved
through `modules_to_save` as `base_model.model.classifier.<...>`.

Which modules get LoRA and which head modules are saved in full is loracls.placement's AdapterLayout (its docstring
has the head variants and what PEFT makes of each saved adapter).  Here `inject` puts PEFT's LoRA on a model as a
layout says, and `adapter_config` writes the same settings to adapter_config.json.

A full fine-tune (method full, layout placement.WholeModel) has no adapter: the same functions save and read its
whole model in the same folder as a transformers model, config.json and model.safetensors (rundir.MODEL_CONFIG,
MODEL_WEIGHTS), so the training loop and the run's readers never ask which method trained it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loracls.atomic import atomic_write_bytes, atomic_write_text
from loracls.config import LoraSettings
from loracls.errors import LoraclsError, first_line
from loracls.placement import AdapterLayout, WholeModel
from loracls.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, MODEL_WEIGHTS


def saved_name(name: str) -> str:
    """PEFT's in-memory parameter name -> the name it saves under (adapter name and wrapper segments dropped)."""
    return name.replace(".modules_to_save.default", "").replace(".default", "")


def inject(model, lora: LoraSettings, layout: AdapterLayout):
    """PEFT's LoRA on a transformers model, as `layout` says: the RoBERTa linear / native-lora heads get their
    identity classifier.dense first, and that frozen copy stays frozen inside PEFT's wrapper."""
    from peft import LoraConfig, get_peft_model

    if layout.identity_keys is not None:
        dense = model.get_submodule(layout.identity_keys[0].removeprefix("base_model.model.").split(".base_layer")[0]
                                    .removesuffix(".weight"))
        with torch.no_grad():
            dense.weight.copy_(torch.eye(dense.in_features, device=dense.weight.device))
            dense.bias.zero_()
    config = LoraConfig(task_type=layout.task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=layout.target_regex, use_rslora=lora.rslora, bias="none",
                        modules_to_save=list(layout.modules_to_save), use_dora=lora.method == "dora",
                        init_lora_weights="pissa" if lora.init == "pissa" else True,
                        rank_pattern=layout.rank_pattern(lora))
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise LoraclsError(f"PEFT cannot put LoRA on this model ({first_line(e, 100)})") from None
    for name, p in peft_model.named_parameters():
        if layout.identity_keys is not None and saved_name(name) in layout.identity_keys:
            p.requires_grad_(False)
    return peft_model


def saved_settings(lora: LoraSettings) -> LoraSettings:
    """The LoRA setting of the adapter *file*: a PiSSA adapter is saved as the plain LoRA of twice the rank that
    makes the same change to the original weights, [A; A0] and [B, -B0] (alpha scaled to keep alpha / r), as
    PEFT's own conversion does.  Every other setting is saved as it trains."""
    if lora.init != "pissa":
        return lora
    return dataclasses.replace(lora, rank=2 * lora.rank, init="kaiming",
                               alpha=lora.alpha * (2 ** 0.5 if lora.rslora else 2),
                               layer_ranks=None if lora.layer_ranks is None else
                               {k: 2 * v for k, v in lora.layer_ranks.items()})


def pissa_to_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter file of a PiSSA run: dW = B A - B0 A0 = [B, -B0] [A; A0] (see saved_settings)."""
    out = dict(trained)
    for k in trained:
        if ".lora_A." in k:
            out[k] = torch.cat([trained[k], initial[k]], dim=0)
        elif ".lora_B." in k:
            out[k] = torch.cat([trained[k], -initial[k]], dim=1)
    return out


def adapter_config(lora: LoraSettings, layout: AdapterLayout | WholeModel, *, base_model: str) -> dict:
    """The adapter_config.json contents PEFT needs to rebuild the same LoRA model (`lora` as saved_settings
    gives it); for a full fine-tune, the classifier's config.json."""
    if isinstance(layout, WholeModel):
        return dict(layout.config)
    extra = {}
    if lora.method == "dora":
        extra["use_dora"] = True
    if lora.layer_ranks:
        extra["rank_pattern"] = layout.rank_pattern(lora)
    return {
        "peft_type": "LORA",
        "task_type": layout.task_type,
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": layout.target_regex,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": list(layout.modules_to_save),
        "inference_mode": True,
        **extra,
    }


def _file_names(config: dict) -> tuple[str, str]:
    """(config file, weights file) of the weights `config` describes: PEFT's adapter, or a whole model."""
    return (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if "peft_type" in config else (MODEL_CONFIG, MODEL_WEIGHTS)


def write_adapter(folder: str | Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write an adapter folder (or a full fine-tune's model folder, as `config` says).  Each file is written under a
    temporary name and renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config_name, weights_name = _file_names(config)
    atomic_write_text(folder / config_name, json.dumps(config, indent=2) + "\n")
    atomic_write_bytes(folder / weights_name, _safetensors_bytes(tensors))


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read adapter_config.json and the weights (a full fine-tune's folder: config.json and model.safetensors); a
    missing or corrupt file is a LoraclsError."""
    folder = Path(folder)
    whole = (folder / MODEL_WEIGHTS).is_file() and not (folder / ADAPTER_WEIGHTS).is_file()
    cfg_path, w_path = (folder / n for n in ((MODEL_CONFIG, MODEL_WEIGHTS) if whole else
                                             (ADAPTER_CONFIG, ADAPTER_WEIGHTS)))
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
        raise LoraclsError(f"{w_path} is corrupt or truncated ({first_line(e)}); "
                           "retrain or restore the run") from None
    return config, state


__all__ = ["saved_name", "inject", "saved_settings", "pissa_to_lora", "adapter_config", "write_adapter",
           "read_adapter"]
