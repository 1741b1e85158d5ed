"""Reading a BERT-family checkpoint for the fast backend: every tensor of the folder (safetensors preferred,
sharded or not; .bin with weights_only), the model prefix stripped, and a check that every tensor the layout
needs is there."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loracls.errors import LoraclsError, first_line
from loracls.families import Family

# The BERT layout's per-layer tensors beyond the LoRA targets (whose paths come from loracls.families).
LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
EMBEDDINGS = ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
              "LayerNorm.weight", "LayerNorm.bias")


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `model_dir` (safetensors preferred, sharded or not)."""
    from safetensors.torch import load_file

    def read(name: str) -> dict[str, torch.Tensor]:
        try:
            if name.endswith(".safetensors"):
                return load_file(str(model_dir / name))
            return torch.load(model_dir / name, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated or pickled with code: one line, no traceback
            raise LoraclsError(f"cannot read {model_dir / name} ({first_line(e)}); re-download the model") from None

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (model_dir / single).is_file():
            return read(single)
        if (model_dir / index).is_file():
            shards = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in read(s).items()}
    raise LoraclsError(f"{model_dir} has no model.safetensors or pytorch_model.bin; point --model at a full "
                       "model folder")


def strip_prefix(state: dict[str, torch.Tensor], model_dir: Path) -> dict[str, torch.Tensor]:
    """Drop the `bert.` / `roberta.` / any prefix (and heads of other tasks), and rename old LayerNorm
    gamma/beta to weight/bias."""
    anchor = "embeddings.word_embeddings.weight"
    found = [k for k in state if k.endswith(anchor)]
    if not found:
        raise LoraclsError(f"the checkpoint in {model_dir} has no {anchor}; is it a BERT-family encoder?")
    prefix = min(found, key=len)[: -len(anchor)]
    out = {}
    for k, v in state.items():
        if k.startswith(prefix) or k.startswith("classifier."):  # a saved seq-cls head sits outside the prefix
            k = k[len(prefix):] if k.startswith(prefix) else k
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            out[k] = v
    return out


def check_complete(state: dict[str, torch.Tensor], family: Family, num_layers: int, model_type: str) -> None:
    """Every tensor the fast encoder reads must be in the checkpoint."""
    modules = [t.path for t in family.targets.values()] + list(LAYER_NORMS)
    required = [f"embeddings.{k}" for k in EMBEDDINGS]
    required += [f"{family.layer.format(i)}.{m}.{p}" for i in range(num_layers) for m in modules
                 for p in ("weight", "bias")]
    missing = [k for k in required if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoraclsError(f"the checkpoint lacks {missing[0]}{more}; it does not match its config.json "
                           f"({model_type}, {num_layers} layers)")
