"""Model backends behind one interface (see base.py).

- `fast`: loracls' own packed BERT-family encoder with fused LoRA (fast.py).
- `peft`: transformers + PEFT, any architecture they support (peft_backend.py).

`select_backend("auto", ...)` takes the first backend in BACKENDS that supports the configuration.
"""

from __future__ import annotations

from typing import Any

from loracls.backends.base import Backend, Classifier
from loracls.config import LoraSettings
from loracls.errors import LoraclsError


def _backends() -> dict[str, Backend]:
    from loracls.backends.fast import FastBackend
    from loracls.backends.peft_backend import PeftBackend

    return {"fast": FastBackend(), "peft": PeftBackend()}


def select_backend(name: str, model_config: Any, lora: LoraSettings) -> Backend:
    """The backend called `name`, or under "auto" the first one that supports this model and LoRA setup."""
    backends = _backends()
    if name == "auto":
        for backend in backends.values():
            if backend.unsupported_reason(model_config, lora) is None:
                return backend
        reasons = "; ".join(f"{n}: {b.unsupported_reason(model_config, lora)}" for n, b in backends.items())
        raise LoraclsError(f"no backend supports this configuration ({reasons})")
    if name not in backends:
        raise LoraclsError(f"unknown backend {name!r}; choose auto, {', '.join(backends)}")
    reason = backends[name].unsupported_reason(model_config, lora)
    if reason:
        raise LoraclsError(f"backend {name!r} cannot run this configuration: {reason}; try --backend auto")
    return backends[name]


__all__ = ["Backend", "Classifier", "select_backend"]
