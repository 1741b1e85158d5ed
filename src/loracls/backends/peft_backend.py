"""The reference backend: transformers' AutoModelForSequenceClassification with PEFT's LoRA.

It runs any architecture transformers and PEFT support, and it is what the fast backend is checked against.
Batches are padded to their longest example with an attention mask, the common transformers recipe.

Head variants (config.HEAD_CHOICES; the file format is in peft_format's docstring), for BERT and RoBERTa:
- native: PEFT's SEQ_CLS model, the whole classifier in modules_to_save.
- linear: BERT as native.  RoBERTa: classifier.dense is set to the identity before PEFT wraps the model, and the
  modules_to_save copy of it is frozen: only classifier.out_proj trains.  The identity is saved with the adapter.
- native-lora: BERT: LoRA on bert.pooler.dense as well, classifier in modules_to_save.  RoBERTa: a plain PeftModel
  (task_type=None) with LoRA on the identity classifier.dense and modules_to_save=["classifier.out_proj"]; the
  identity base layer is saved with the adapter under ...classifier.dense.base_layer.{weight,bias}.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from loracls.backends.base import Backend, Classifier
from loracls.config import LoraSettings
from loracls.errors import LoraclsError, first_line
from loracls import peft_format
from loracls.plan import SUPPORTED_MODEL_TYPES


def _saved_name(name: str) -> str:
    """PEFT's in-memory parameter name -> the name it saves under (adapter name and wrapper segments dropped)."""
    return name.replace(".modules_to_save.default", "").replace(".default", "")


class PeftClassifier(Classifier):
    def __init__(self, model: nn.Module, pad_token_id: int, num_labels: int, device: torch.device,
                 identity_keys: tuple[str, str] | None = None):
        super().__init__()
        self.model = model
        # for peft_format.adapter_config(..., model_type=model.model_type)
        self.model_type: str | None = getattr(getattr(model, "config", None), "model_type", None)
        self.pad_token_id = pad_token_id
        self.num_labels = num_labels
        self.device = device
        self.merged = False
        # Saved names of the frozen identity classifier.dense (RoBERTa linear / native-lora heads): saved with the
        # adapter, never trained.
        self.identity_keys = identity_keys
        self._freeze_identity()

    def _in_memory(self, saved: str) -> nn.Parameter:
        """The model parameter saved under `saved` (PEFT adds '.modules_to_save.default' inside modules_to_save)."""
        for name, p in self.model.named_parameters():
            if _saved_name(name) == saved:
                return p
        raise KeyError(saved)

    def _freeze_identity(self) -> None:
        if self.identity_keys is not None and not self.merged:
            for k in self.identity_keys:
                self._in_memory(k).requires_grad_(False)

    def collate(self, token_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(t) for t in token_ids)
        ids = torch.full((len(token_ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
        for i, t in enumerate(token_ids):
            ids[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
            mask[i, :len(t)] = 1
        return {"input_ids": ids.to(self.device, non_blocking=True),
                "attention_mask": mask.to(self.device, non_blocking=True)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).logits.float()

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield _saved_name(name), p

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if self.merged:
            raise RuntimeError("the adapter of a merged model cannot be read back")
        state = dict(get_peft_model_state_dict(self.model))
        for k in self.identity_keys or ():  # native-lora's base_layer is no adapter tensor to PEFT: add it
            if k not in state:
                state[k] = self._in_memory(k)
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        _check_adapter_keys(expected, state)
        state = dict(state)
        peft_keys = get_peft_model_state_dict(self.model).keys()
        with torch.no_grad():  # tensors PEFT does not load itself (native-lora's identity base layer)
            for k in self.identity_keys or ():
                if k not in peft_keys:
                    self._in_memory(k).copy_(state.pop(k).to(self.device))
        set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in state.items()})
        self._freeze_identity()

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge() was already called")
        self.model = self.model.merge_and_unload()
        self.merged = True

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _check_adapter_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LoraclsError(f"the adapter lacks {len(missing)} tensors the model needs (first: {missing[0]}); "
                           "it was trained with other LoRA settings: use that run's config")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise LoraclsError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}; "
                               "it was trained with another rank or model")


class PeftBackend(Backend):
    name = "peft"

    def unsupported_reason(self, model_config: Any, lora: LoraSettings) -> str | None:
        mt = getattr(model_config, "model_type", None)
        if lora.head != "native" and mt not in SUPPORTED_MODEL_TYPES:  # where linear / native-lora are defined
            return f"head {lora.head!r} is defined for {', '.join(SUPPORTED_MODEL_TYPES)} only, not {mt!r}"
        return None

    def build(self, model_dir: str, num_labels: int, lora: LoraSettings, device: torch.device, *,
              seed: int, trust_remote_code: bool = False) -> PeftClassifier:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        # The head is new by design; transformers' "newly initialized weights" notice would only alarm users.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            torch.manual_seed(seed)  # the new head and LoRA A are drawn from the global RNG
            base = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, trust_remote_code=trust_remote_code, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        reason = self.unsupported_reason(base.config, lora)
        if reason:
            raise LoraclsError(f"the peft backend cannot run {model_dir}: {reason}")
        mt = base.config.model_type
        identity = peft_format.identity_head_keys(lora, mt)
        if identity is not None:  # RoBERTa linear / native-lora: classifier.dense is frozen at the identity
            with torch.no_grad():
                base.classifier.dense.weight.copy_(torch.eye(base.classifier.dense.in_features))
                base.classifier.dense.bias.zero_()
        cfg = LoraConfig(task_type=peft_format.task_type(lora, mt), r=lora.rank, lora_alpha=lora.alpha,
                         lora_dropout=lora.dropout, target_modules=peft_format.target_regex(lora, mt),
                         use_rslora=lora.rslora, bias="none", modules_to_save=peft_format.modules_to_save(lora, mt))
        try:
            model = get_peft_model(base, cfg)
        except ValueError as e:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
            raise LoraclsError(f"LoRA targets match no module of this model ({first_line(e, 60)}); "
                               f"its linear layers are named: {', '.join(names)}") from None
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        return PeftClassifier(model.to(device), pad, num_labels, device, identity)
