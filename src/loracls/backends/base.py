"""The one small interface every model backend implements.

The training loop, the data code, the run directory and the CLI talk only to `Classifier` (a LoRA-adapted encoder
with a classification head, or under method full an encoder and head trained whole) and `Backend` (which builds
one).  They never ask which backend or which method is in use.

Conventions shared by all backends:
- Adapter tensors are named exactly as PEFT saves them in `adapter_model.safetensors`, for example
  `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight` and, for the trainable head,
  `base_model.model.classifier.weight`.  That makes the run directory readable by PEFT and lets any backend load
  any other backend's adapter.
- A batch is whatever `collate` returns; only the backend looks inside it.  Labels stay outside.
- `merge()` folds LoRA into the frozen weights for inference.  Switching `train()`/`eval()` never merges.
- A full fine-tune (method full) trains every parameter under transformers' own names, which hold no 'lora_', in
  transformers' order, from transformers' own starting weights (`pretrained_classifier`); its "adapter" is the
  whole model's state, saved as a transformers model (peft_format), and merge() has no LoRA to fold in (the fast
  backend only stores the weights in the compute dtype for inference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from loracls.backends.precision import resolve as resolve_precision
from loracls.config import LoraSettings
from loracls.errors import LoraclsError, first_line


class Classifier(nn.Module, ABC):
    """A LoRA-adapted encoder plus classification head.  Subclasses are plain nn.Modules."""

    num_labels: int
    device: torch.device
    model_type: str  # the Hugging Face config's model_type (bert, roberta, ...)
    precision: str  # 'fp32' or 'bf16' (backends/precision.py)
    layout: Any  # placement.AdapterLayout: what LoRA goes where, in PEFT's terms (written to adapter_config.json)

    # -- the forward pass ---------------------------------------------------------------------------------------
    @abstractmethod
    def collate(self, token_ids: Sequence[Sequence[int]]) -> Any:
        """Turn tokenized examples (each a list of ids, special tokens included) into one batch on self.device."""

    @abstractmethod
    def forward(self, batch: Any) -> torch.Tensor:
        """Logits, float32, shape [batch, num_labels]."""

    # -- batching: which examples go together -------------------------------------------------------------------
    def train_batches(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
        """Index lists, one per training step, covering every example once.  Default: a random permutation."""
        order = torch.randperm(len(lengths), generator=generator).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def eval_batches(self, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
        """Index lists for inference, covering every example once.  Default: input order."""
        return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]

    # -- parameters and the adapter file format ----------------------------------------------------------------
    @abstractmethod
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) for every trainable tensor, in a fixed order.  Names use PEFT's adapter key names, and
        the training loop relies on two facts of them: 'lora_' is in the name of every tensor but the
        classification head's (LoRA's A and B, DoRA's lora_magnitude_vector), and 'lora_B' marks a B matrix (LoRA+
        gives those their own learning rate; a classifier warm-up trains only the tensors without 'lora_')."""

    @abstractmethod
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under PEFT's saved key names, float32 on the CPU."""

    def saved_adapter(self) -> dict[str, torch.Tensor]:
        """The tensors of the adapter *file* (peft_format.saved_settings): the trainables, except that a PiSSA
        adapter is converted to the equivalent plain LoRA."""
        return self.adapter_state_dict()

    @abstractmethod
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of adapter_state_dict.  Raises LoraclsError on a missing or mis-shaped key."""

    @abstractmethod
    def merge(self) -> None:
        """Fold LoRA into the frozen weights for fast inference.  After this the model is for inference only."""

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts as PEFT reports them: total counts frozen base weights once."""
        trainable = sum(p.numel() for _, p in self.trainable_named_parameters())
        return trainable, self.total_parameters()

    @abstractmethod
    def total_parameters(self) -> int:
        """All parameters of the adapted model, frozen base included (the denominator of '% trainable')."""


class Backend(ABC):
    """Builds Classifiers.  One instance per backend, registered in loracls.backends."""

    name: str

    def precision(self, asked: str, device: torch.device) -> tuple[str, str]:
        """The precision this backend runs `asked` (auto, fp32, bf16) in on `device`: ('fp32' | 'bf16', why)."""
        return resolve_precision(asked, device)

    @abstractmethod
    def unsupported_reason(self, model_config: Any, lora: LoraSettings) -> str | None:
        """None when this backend can run the configuration, else a short reason (shown under --backend auto)."""

    @abstractmethod
    def build(self, model_dir: str, model_config: Any, num_labels: int, lora: LoraSettings, device: torch.device, *,
              seed: int, trust_remote_code: bool = False, precision: str | None = None) -> Classifier:
        """Load the pretrained encoder from `model_dir` (a local folder; `model_config` is its config.json as a
        transformers config), add a freshly initialized head and LoRA (A: kaiming-uniform as PEFT, B: zeros,
        drawn from `seed`), freeze everything else.  `precision` is 'fp32' or 'bf16' as `self.precision`
        resolved it (None: the backend's default for the device)."""


def cpu_copies(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """name -> a float32 copy on the CPU: what adapter_state_dict returns."""
    return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in named}


@torch.no_grad()
def copy_into(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Each tensor of `expected` (name -> the model's own) overwritten with `state`'s of that name, after
    check_adapter_keys."""
    check_adapter_keys({k: p.shape for k, p in expected.items()}, state)
    for k, p in expected.items():
        p.copy_(state[k].to(p.device, p.dtype))


def check_adapter_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter that lacks a tensor, has one too many, or has one of another shape."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {extra[0]}"
        n = len(missing) + len(extra) - 1
        raise LoraclsError(f"the adapter {what}{f' (and {n} more mismatches)' if n else ''}; it was trained with "
                           "other targets, layers, head or model: use that run's config")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise LoraclsError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}; "
                               "it was trained with another rank, model or label count")


def pretrained_classifier(model_dir: str, model_config: Any, num_labels: int, seed: int,
                          trust_remote_code: bool = False) -> nn.Module:
    """transformers' AutoModelForSequenceClassification for the model in `model_dir`, fp32, with a new head of
    `num_labels` drawn from the global RNG seeded by `seed`: what a transformers user starts a fine-tune from, and
    so the starting point of every backend's full fine-tune."""
    import copy

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The head is new by design; transformers' "newly initialized weights" notice would only alarm users.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(seed)  # the new head (and PEFT's LoRA A, drawn next) come from the global RNG
        cfg = copy.deepcopy(model_config)
        cfg.num_labels = num_labels
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=cfg, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:  # corrupt, truncated or mismatched weights
        if getattr(e, "errno", None) is not None or "can't allocate memory" in str(e):
            raise  # a condition of the machine (disk, memory), not of the folder
        raise LoraclsError(f"transformers cannot load the model in {model_dir} ({first_line(e)}); "
                           "re-download or repair the model folder") from None
    finally:
        hf_logging.set_verbosity(verbosity)
