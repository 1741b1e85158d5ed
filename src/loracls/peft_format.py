"""PEFT's adapter file format, written and read in one place.

A run's `adapter/` folder is exactly what `peft.PeftModel.from_pretrained(base, folder)` reads:
`adapter_config.json` plus `adapter_model.safetensors`.  Tensor names follow PEFT's saved form, e.g.
`base_model.model.roberta.encoder.layer.3.attention.self.value.lora_B.weight`, and the trainable head is saved
through `modules_to_save` as `base_model.model.classifier.<...>`.

Why a regex for target_modules: PEFT matches a list entry as a module-name *suffix*, so "output.dense" would also
hit "attention.output.dense", and a list cannot restrict layers and module types together.  A regex string is
matched in full against each module name, which says exactly what was adapted.

Heads (config.HEAD_CHOICES), and what PEFT 0.21 makes of each saved adapter:

    model     head         task_type  modules_to_save        extra LoRA target    frozen tensors saved
    bert      native       SEQ_CLS    classifier             -                    -
    bert      linear       (identical to native: a linear layer on the pooler output)
    bert      native-lora  SEQ_CLS    classifier             bert.pooler.dense    -
    roberta   native       SEQ_CLS    classifier             -                    -
    roberta   linear       SEQ_CLS    classifier             -                    classifier.dense (= identity)
    roberta   native-lora  None       classifier.out_proj    classifier.dense     classifier.dense.base_layer (= I)

For RoBERTa, `linear` and `native-lora` freeze `classifier.dense` at the identity (weight I, bias 0), so the head is
out_proj(tanh(h0)) plus, for native-lora, a LoRA update on the identity.  Every variant is PEFT-loadable with
identical logits (`PeftModel.from_pretrained(AutoModelForSequenceClassification..., folder)`), and
`merge_and_unload()` (what `loracls export` runs) gives the plain architecture with the same logits:
- roberta linear: the identity dense travels through modules_to_save=["classifier"], PEFT's own mechanism.  PEFT
  therefore rebuilds dense as a trainable modules_to_save copy: the logits are identical, but PEFT's trainable count
  (with is_trainable=True) differs from loracls', which trains out_proj only.
- roberta native-lora: PEFT cannot put LoRA on a module inside a modules_to_save module (task_type="SEQ_CLS" always
  adds the whole "classifier" and then silently skips the LoRA target inside it), so this adapter uses
  task_type=None (a plain PeftModel; its forward returns the same SequenceClassifierOutput) with
  modules_to_save=["classifier.out_proj"].  The identity base of the adapted dense is saved under
  `base_model.model.classifier.dense.base_layer.weight` / `.bias`: PEFT's loader passes checkpoint keys that are no
  adapter parameter through unchanged to `load_state_dict(strict=False)` (as it does for saved biases), so the frozen
  base layer becomes the identity again on load.  PEFT's trainable count matches loracls' here.  One limit: loading
  such an adapter as a *second* adapter into a PeftModel overwrites the shared frozen base of classifier.dense.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loracls.config import LoraSettings
from loracls.errors import LoraclsError, first_line
from loracls.plan import ROBERTA_TYPES

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


def _is_roberta(model_type: str | None) -> bool:
    return model_type in ROBERTA_TYPES


def encoder_regex(lora: LoraSettings) -> str:
    """A regex that full-matches the names of exactly the adapted encoder linears."""
    layers = r"\d+" if lora.layers is None else "(?:" + "|".join(str(i) for i in lora.layers) + ")"
    paths = "|".join(re.escape(TARGET_MODULE_PATHS[t]) for t in lora.targets)
    return rf".*\.encoder\.layer\.{layers}\.(?:{paths})"


def head_lora_module(lora: LoraSettings, model_type: str | None) -> str | None:
    """The head module that gets LoRA (native-lora only): BERT's pooler dense or RoBERTa's classifier.dense."""
    if lora.head != "native-lora":
        return None
    if model_type is None:
        raise ValueError("head 'native-lora' needs the model type (bert or roberta) to name its LoRA module; "
                         "pass model_type=model_config.model_type")
    return "classifier.dense" if _is_roberta(model_type) else "bert.pooler.dense"


def target_regex(lora: LoraSettings, model_type: str | None = None) -> str:
    """A regex that PEFT full-matches against module names: the adapted encoder linears, plus, for native-lora, the
    head's LoRA module.  Without `model_type` (and for the other heads) it is `encoder_regex(lora)` unchanged."""
    enc = encoder_regex(lora)
    head = head_lora_module(lora, model_type) if model_type is not None else None
    return enc if head is None else rf"(?:{enc})|{re.escape(head)}"


def adapted_module_names(module_names: list[str], lora: LoraSettings, model_type: str | None = None) -> list[str]:
    """The names among `module_names` that `target_regex` selects (PEFT uses re.fullmatch)."""
    pattern = re.compile(target_regex(lora, model_type))
    return [n for n in module_names if pattern.fullmatch(n)]


def modules_to_save(lora: LoraSettings, model_type: str | None = None) -> list[str]:
    """Head modules saved in full with the adapter (see the table in the module docstring)."""
    if lora.head == "native-lora" and _is_roberta(model_type):
        return ["classifier.out_proj"]
    return ["classifier"]


def task_type(lora: LoraSettings, model_type: str | None = None) -> str | None:
    """"SEQ_CLS", except for RoBERTa native-lora: SEQ_CLS would force the whole classifier into modules_to_save,
    where PEFT cannot put LoRA on classifier.dense."""
    if lora.head == "native-lora" and _is_roberta(model_type):
        return None
    return "SEQ_CLS"


def identity_head_keys(lora: LoraSettings, model_type: str | None) -> tuple[str, str] | None:
    """(weight key, bias key) under which the adapter stores the frozen identity `classifier.dense` of the RoBERTa
    linear and native-lora heads, or None for heads without one.  Not trained; saved so that PEFT (and so
    `loracls export`) rebuilds the identity."""
    if not _is_roberta(model_type) or lora.head == "native":
        return None
    base = "base_model.model.classifier.dense" + (".base_layer" if lora.head == "native-lora" else "")
    return f"{base}.weight", f"{base}.bias"


def adapter_config(lora: LoraSettings, *, base_model: str, save_modules: list[str] | None = None,
                   model_type: str | None = None) -> dict:
    """The adapter_config.json contents PEFT needs to rebuild the same LoRA model.

    `model_type` (the base model's config.model_type) picks the head's format; None is right for the native and
    linear heads of every model type (their config is the same) and an error for native-lora."""
    if lora.head == "native-lora" and model_type is None:
        raise ValueError("adapter_config for head 'native-lora' needs model_type (model_config.model_type): the "
                         "LoRA module and modules_to_save differ between BERT and RoBERTa")
    return {
        "peft_type": "LORA",
        "task_type": task_type(lora, model_type),
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": target_regex(lora, model_type),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": save_modules if save_modules is not None else modules_to_save(lora, model_type),
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
        raise LoraclsError(f"{w_path} is corrupt or truncated ({first_line(e)}); "
                           "retrain or restore the run") from None
    return config, state


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TARGET_MODULE_PATHS", "encoder_regex", "head_lora_module",
           "target_regex", "adapted_module_names", "modules_to_save", "task_type", "identity_head_keys",
           "adapter_config", "write_adapter", "read_adapter"]
