"""Model backends behind one interface (see base.py).

- `fast`: loracls' own packed BERT-family encoder with fused LoRA (fast/).
- `peft`: transformers + PEFT, every encoder family in loracls.families, and model types with no row there,
  their targets inferred from their layers (peft.py).  `fast` stays with the table's BERT and RoBERTa rows: an
  unlisted type whose modules are named like BERT's may still differ in its layer maths (RoFormer's rotary
  positions, Megatron-BERT's pre-LayerNorm, ERNIE's optional task embeddings), which names cannot show.

`select_backend("auto", ...)` takes the first backend in BACKENDS that supports the configuration.
"""

from __future__ import annotations

from typing import Any

from loracls.backends.base import Backend, Classifier
from loracls.config import LoraSettings
from loracls.errors import LoraclsError


def _backends() -> dict[str, Backend]:
    from loracls.backends.fast import FastBackend
    from loracls.backends.peft import PeftBackend

    return {"fast": FastBackend(), "peft": PeftBackend()}


def select_backend(name: str, model_config: Any, lora: LoraSettings) -> tuple[Backend, str]:
    """The backend called `name`, or under "auto" the first one that supports this model and LoRA setup; and a
    line for the user saying which runs and, when auto passes over one, why."""
    backends = _backends()
    if name == "auto":
        passed = []
        for backend in backends.values():
            reason = backend.unsupported_reason(model_config, lora)
            if reason is None:
                why = f" ({'; '.join(passed)})" if passed else ""
                return backend, f"backend auto -> {backend.name}{why}"
            passed.append(f"{backend.name} cannot: {reason}")
        raise LoraclsError(f"no backend supports this configuration ({'; '.join(passed)})")
    if name not in backends:
        raise LoraclsError(f"unknown backend {name!r}; choose auto, {', '.join(backends)}")
    reason = backends[name].unsupported_reason(model_config, lora)
    if reason:
        raise LoraclsError(f"backend {name!r} cannot run this configuration: {reason}; try --backend auto")
    return backends[name], f"backend {name}"


__all__ = ["Backend", "Classifier", "select_backend"]
