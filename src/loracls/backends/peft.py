"""The reference backend: transformers' AutoModelForSequenceClassification with PEFT's LoRA.

It runs every encoder transformers builds a sequence classifier for: the families in loracls.families by their
portable target names, any other by the targets inferred from its layers (loracls.target_inference) or by
module-name suffixes.  It is what the fast backend is checked against.
Batches are padded to their longest example with an attention mask, the common transformers recipe, and carry a
text pair's token types (models.PairIds) where the model has more than one.

What LoRA goes where, and how the head is saved, is `placement.layout`; PEFT does the injection
(`peft_format.inject`).  A full fine-tune (method full) is the same transformers model with no LoRA and every
parameter trained (FullClassifier).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from loracls import peft_format, placement
from loracls.backends.base import Backend, Classifier, check_adapter_keys, copy_into, cpu_copies, pretrained_classifier
from loracls.backends.precision import resolve as resolve_precision
from loracls.config import LoraSettings
from loracls.errors import LoraclsError, first_line
from loracls.models import PairIds, token_types


def refuse_what_cannot_classify_a_batch(model: nn.Module, model_dir: str) -> None:
    """One line, before any training, where transformers' own model cannot classify a padded batch as built from
    its config.json (X-MOD without a default language, Reformer's fixed lengths): otherwise the first step would
    fail with the model's traceback."""
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 8:  # no token ids to make up: the first step will tell
        return
    mid = vocab // 2
    # BART finds its end-of-sequence tokens; ids past the embeddings are another tokenizer's (a config's defaults)
    bos, eos = ([t] if isinstance(t, int) and 0 <= t < vocab else []
                for t in (getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None)))
    rows = [bos + t + eos for t in ([mid, mid + 1, mid + 2], [mid, mid + 1])]
    ids = torch.full((2, len(rows[0])), cfg.pad_token_id if cfg.pad_token_id is not None else 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.as_tensor(row), 1
    was_training = model.training
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # what a forward in training mode may update
    try:
        # in both modes (Reformer checks lengths in training only), leaving the random stream and buffers as found
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for training in (False, True):
                model.train(training)
                model(input_ids=ids, attention_mask=mask)
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        if "can't allocate memory" in str(e) or "out of memory" in str(e):
            raise
        raise LoraclsError(f"transformers' {cfg.model_type} model from {model_dir} cannot classify a padded batch "
                           f"of two short texts ({first_line(e, 160)}); fix its config.json as that says, or pick "
                           "another model") from None
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])


class TransformersClassifier(Classifier):
    """A transformers sequence classifier (`model`) behind the Classifier interface: padded batches, fp32 logits.
    What trains and how it is saved is the subclass's: PeftClassifier (LoRA) or FullClassifier (everything)."""

    def __init__(self, model: nn.Module, layout: placement.AdapterLayout | placement.WholeModel, pad_token_id: int,
                 num_labels: int, device: torch.device, model_type: str | None):
        super().__init__()
        self.model = model
        self.layout = layout
        self.model_type = model_type
        self.pad_token_id = pad_token_id
        self.num_labels = num_labels
        self.device = device
        self.merged = False
        self.precision = "fp32"
        # Models with one token type (RoBERTa) take none; others get them when a batch holds a pair.
        self.token_types = int(getattr(model.config, "type_vocab_size", 0) or 0) > 1

    def collate(self, token_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(t) for t in token_ids)
        ids = torch.full((len(token_ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
        for i, t in enumerate(token_ids):
            ids[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
            mask[i, :len(t)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.token_types and any(isinstance(t, PairIds) for t in token_ids):
            types = torch.zeros_like(ids)  # padding: type 0, as transformers pads token_type_ids
            for i, t in enumerate(token_ids):
                types[i, :len(t)] = torch.as_tensor(token_types(t), dtype=torch.long)
            batch["token_type_ids"] = types
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # bf16: torch.autocast, as a transformers Trainer runs with bf16=True (fp32 weights, bf16 products)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(**batch).logits.float()

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class FullClassifier(TransformersClassifier):
    """A full fine-tune (method full): every parameter of the encoder and the head trains, under transformers' own
    names (no 'lora_' in any: the training loop gives them all the head's optimizer group).  Its saved weights are
    the model's own state, so the run's folder is a transformers model; there is nothing to merge."""

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(list(self.model.named_parameters()))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return cpu_copies(self.model.named_parameters())

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        copy_into(dict(self.model.named_parameters()), state)

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge() was already called")
        self.merged = True  # no LoRA to fold in: the weights are the model's own


class PeftClassifier(TransformersClassifier):
    """LoRA by PEFT on a transformers model: the trainables are PEFT's adapter and head, under its saved names."""

    def __init__(self, model: nn.Module, layout: placement.AdapterLayout, pad_token_id: int, num_labels: int,
                 device: torch.device, model_type: str | None):
        super().__init__(model, layout, pad_token_id, num_labels, device, model_type)
        self.initial: dict[str, torch.Tensor] | None = None  # PiSSA's A0 and B0, for the saved adapter

    def _in_memory(self, saved: str) -> nn.Parameter:
        """The model parameter saved under `saved` (PEFT adds '.modules_to_save.default' inside modules_to_save)."""
        for name, p in self.model.named_parameters():
            if peft_format.saved_name(name) == saved:
                return p
        raise KeyError(saved)

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield peft_format.saved_name(name), p

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if self.merged:
            raise RuntimeError("the adapter of a merged model cannot be read back")
        state = dict(get_peft_model_state_dict(self.model))
        for k in self.layout.identity_keys or ():  # native-lora's base_layer is no adapter tensor to PEFT: add it
            if k not in state:
                state[k] = self._in_memory(k)
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}

    def saved_adapter(self) -> dict[str, torch.Tensor]:
        state = self.adapter_state_dict()
        if self.initial is None:
            return state
        state = peft_format.pissa_to_lora(state, self.initial)
        if self.layout.identity_keys is not None:  # PiSSA left its residual in the identity dense: save I, 0
            w, b = self.layout.identity_keys
            state[w], state[b] = torch.eye(state[w].shape[0]), torch.zeros_like(state[b])
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        check_adapter_keys(expected, state)
        state = dict(state)
        peft_keys = get_peft_model_state_dict(self.model).keys()
        with torch.no_grad():  # tensors PEFT does not load itself (native-lora's identity base layer)
            for k in self.layout.identity_keys or ():
                if k not in peft_keys:
                    self._in_memory(k).copy_(state.pop(k).to(self.device))
        set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in state.items()})
        for k in self.layout.identity_keys or ():
            self._in_memory(k).requires_grad_(False)

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge() was already called")
        self.model = self.model.merge_and_unload()
        self.merged = True


class PeftBackend(Backend):
    name = "peft"

    def precision(self, asked: str, device: torch.device) -> tuple[str, str]:
        return resolve_precision(asked, device, reference=True)

    def unsupported_reason(self, model_config: Any, lora: LoraSettings) -> str | None:
        fam = placement.family_or_generic(model_config)
        if lora.head != "native" and fam.head is None:
            return f"head {lora.head!r} is defined for the bert and roberta families only"
        if lora.layers is not None and fam.shared_layers:
            return f"{fam.name} shares its layer weights, so --layers cannot pick layers"
        return None

    def build(self, model_dir: str, model_config: Any, num_labels: int, lora: LoraSettings, device: torch.device, *,
              seed: int, trust_remote_code: bool = False, precision: str | None = None) -> TransformersClassifier:
        base = pretrained_classifier(model_dir, model_config, num_labels, seed, trust_remote_code)
        refuse_what_cannot_classify_a_batch(base, model_dir)
        reason = self.unsupported_reason(base.config, lora)
        if reason:
            raise LoraclsError(f"the peft backend cannot run {model_dir}: {reason}")
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        if lora.full:
            classifier = FullClassifier(base.to(device), placement.WholeModel(base.config.to_dict()), pad, num_labels,
                                        device, base.config.model_type)
            classifier.precision = precision or "fp32"
            return classifier
        layout = placement.layout(lora, base.config, placement.linear_names(base), placement.head_modules(base),
                                  placement.model_family(base))
        model = peft_format.inject(base, lora, layout)
        classifier = PeftClassifier(model.to(device), layout, pad, num_labels, device, base.config.model_type)
        classifier.precision = precision or "fp32"
        if lora.init == "pissa":
            classifier.initial = {k: v for k, v in classifier.adapter_state_dict().items() if ".lora_" in k}
        return classifier
