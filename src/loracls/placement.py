"""LoRA placement: which modules of a model get LoRA, and which head modules are trained and saved in full.

`layout()` resolves a run's targets (portable aliases, all-linear, raw suffixes; see loracls.families) against the
model's own linear layers and its head, in PEFT's terms (an AdapterLayout); loracls.peft_format turns that into
PEFT's LoRA on the model and into the adapter files.  A full fine-tune (method full) places no LoRA: its layout is
`WholeModel`, every parameter trained and saved.

Why a regex for target_modules: PEFT matches a list entry as a module-name *suffix*, so BERT's FFN output would
also hit the attention output projection (whose path ends the same way), and a list cannot restrict layers and
module types together.  A regex string is matched in full against each module name, which says exactly what was
adapted.

Heads: `native` saves every head module of the model through modules_to_save (found from the model: its top-level
modules outside the pretrained encoder).  The BERT and RoBERTa families have two more variants, and this is what
PEFT 0.21 makes of each saved adapter:

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

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from loracls.config import LoraSettings
from loracls.errors import LoraclsError
from loracls.families import ALIASES, ALL_LINEAR, Family, family_of

# A model type with no row in the table, where only its config is at hand: its layers are found by the common
# names.  Where the model is at hand, `model_family` infers its layers and targets instead.
GENERIC = Family("generic", (), "", {}, layer_pattern=r"(?:encoder\.)?(?:layers?|blocks?|h)\.(\d+)")


def family_or_generic(model_config) -> Family:
    """The table row, or where there is none and no model to read (a backend's check), the generic fallback."""
    return family_of(model_config) or GENERIC


def model_family(model) -> Family:
    """The table row of a transformers model, or where its type has none, the family inferred from its layers."""
    from loracls.target_inference import infer_family

    return family_of(model.config) or infer_family(model)


@dataclass(frozen=True)
class AdapterLayout:
    """What a LoRA setting means on one model, in PEFT's terms."""

    paths: tuple[str, ...]
    """Module paths inside one encoder layer that get LoRA (ModernBERT's q, k, v: one fused path)."""
    target_regex: str
    """PEFT's target_modules: full-matches exactly the adapted modules."""
    modules_to_save: tuple[str, ...]
    """Head modules trained and saved in full."""
    task_type: str | None
    head_lora: str | None = None
    """The head module that gets LoRA (native-lora)."""
    identity_keys: tuple[str, str] | None = None
    """(weight, bias) keys of the frozen identity classifier.dense saved with the RoBERTa linear / native-lora
    heads, so PEFT (and `loracls export`) rebuild it."""
    layer_key: str = ""
    """Regex of the modules of layer {} (format it with the index): the keys of PEFT's rank_pattern."""

    def rank_pattern(self, lora: LoraSettings) -> dict[str, int]:
        """PEFT's rank_pattern for lora.layer_ranks."""
        return {self.layer_key.format(i): r for i, r in (lora.layer_ranks or {}).items()}


@dataclass(frozen=True)
class WholeModel:
    """The layout of a full fine-tune (method full): no LoRA anywhere, every parameter trained, and saved in place of
    an adapter under transformers' own names beside `config`, the classifier's config.json (as a dict), so the
    saved folder loads with AutoModelForSequenceClassification.from_pretrained."""

    config: dict
    # No LoRA anywhere: what code reading an AdapterLayout asks of one, answered for a whole model.
    paths: ClassVar[tuple[str, ...]] = ()
    head_lora: ClassVar[str | None] = None
    identity_keys: ClassVar[tuple[str, str] | None] = None


def layer_paths(linear_names: list[str], family: Family) -> dict[str, list[int]]:
    """Layer-relative path -> layer indices, for the linear modules (full names) inside encoder layers."""
    pattern = re.compile(rf"(?:^|.*\.){family.layer_regex}\.(.+)")
    out: dict[str, list[int]] = {}
    for name in linear_names:
        m = pattern.fullmatch(name)
        if m:
            out.setdefault(m.group(2), []).append(int(m.group(1)))
    return out


def resolve_paths(lora: LoraSettings, family: Family, linear_names: list[str], model_type: str | None) -> list[str]:
    """The layer-relative module paths `lora.targets` names on this model, in a fixed order."""
    available = layer_paths(linear_names, family)
    if not available and family.inferred:
        raise LoraclsError(f"found no encoder layers holding nn.Linear modules in this {model_type} model (its "
                           f"linear layers: {', '.join(family.layer_linears) or 'none'}); LoRA adapts nn.Linear "
                           "modules, so loracls cannot adapt this model")
    if not available:
        raise LoraclsError(f"found no encoder layers in this {model_type} model (looked for modules named like "
                           f"{family.layer_regex!r}); it may not be an encoder loracls can adapt")
    if lora.targets == [ALL_LINEAR]:
        return list(available)
    paths: list[str] = []
    for t in lora.targets:
        if t in ALIASES:
            if t not in family.targets and family.inferred:
                found = ", ".join(f"{a}={x.path}" for a, x in family.targets.items()) or "none"
                raise LoraclsError(f"model type {model_type!r} has no row in loracls' table, and target {t!r} could "
                                   f"not be inferred from its layers (inferred: {found}); its layers hold "
                                   f"{', '.join(family.layer_linears)}: pass --targets with some of these module "
                                   f"names, or {ALL_LINEAR}")
            if t not in family.targets:
                names = ", ".join(family.targets) or "none: name modules by suffix"
                raise LoraclsError(f"model type {model_type!r} has no LoRA target {t!r} (its targets: {names}); "
                                   f"choose among them, {ALL_LINEAR}, or module names such as "
                                   f"{next(iter(available))!r}")
            hits = [family.targets[t].path]
        else:
            hits = [p for p in available if p == t or p.endswith("." + t)]
        missing = [p for p in hits if p not in available]
        if not hits or missing:
            raise LoraclsError(f"LoRA target {t!r} matches no linear layer of this {model_type} model; its encoder "
                               f"layers hold: {', '.join(available)}")
        paths += [p for p in hits if p not in paths]
    return paths


def layout(lora: LoraSettings, model_config, linear_names: list[str], head_modules: list[str],
           family: Family | None = None) -> AdapterLayout:
    """Resolve `lora` on a model: `linear_names` are the full names of its nn.Linear modules and `head_modules`
    the names of its head (top-level modules outside the encoder).  `family` is `model_family(model)` where the
    caller has the model (a type with no row then has inferred targets), else the table row or GENERIC."""
    family = family or family_or_generic(model_config)
    model_type = getattr(model_config, "model_type", None)
    if lora.layers is not None and family.shared_layers:
        raise LoraclsError(f"{model_type} shares one set of weights across its layers, so --layers cannot pick "
                           "some of them; drop --layers")
    paths = resolve_paths(lora, family, linear_names, model_type)
    layers = r"\d+" if lora.layers is None else "(?:" + "|".join(str(i) for i in lora.layers) + ")"
    layer = family.layer_regex.replace(r"(\d+)", layers, 1)
    enc = r".*\." + layer + r"\.(?:" + "|".join(re.escape(p) for p in paths) + ")"
    pattern = family.layer_regex.replace(r"(\d+)", "{}", 1) + r"\..*"
    saved, task, head_lora, identity = _head_layout(lora.head, family, head_modules, model_type)
    regex = enc if head_lora is None else rf"(?:{enc})|{re.escape(head_lora)}"
    return AdapterLayout(tuple(paths), regex, saved, task, head_lora=head_lora, identity_keys=identity,
                         layer_key=pattern)


def _head_layout(head_name: str, family: Family, head_modules: list[str], model_type):
    """(modules_to_save, task_type, the head module that gets LoRA, the identity dense's keys) for a head."""
    if head_name == "native":
        return tuple(head_modules), "SEQ_CLS", None, None
    head = family.head
    if head is None:
        raise LoraclsError(f"head {head_name!r} is defined for the bert and roberta families, not {model_type!r}; "
                           "use --head native")
    if head.dense_pretrained:  # BERT: the classifier on the frozen pretrained pooler, which native-lora adapts
        return (head.out,), "SEQ_CLS", head.dense if head_name == "native-lora" else None, None
    dense = f"base_model.model.{head.dense}"
    if head_name == "linear":  # the identity dense travels through modules_to_save=[classifier]
        return (head.out.rsplit(".", 1)[0],), "SEQ_CLS", None, (f"{dense}.weight", f"{dense}.bias")
    # native-lora: PEFT cannot put LoRA inside a modules_to_save module, and SEQ_CLS would add the whole
    # classifier to modules_to_save; a plain PeftModel (task_type None) returns the same output.
    return (head.out,), None, head.dense, (f"{dense}.base_layer.weight", f"{dense}.base_layer.bias")


def linear_names(model) -> list[str]:
    """Full names of a transformers model's nn.Linear modules (what LoRA can adapt)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def head_modules(model) -> list[str]:
    """The head of a sequence-classification model, found from the model itself: its top-level modules with
    parameters outside the pretrained encoder (`classifier`, `pre_classifier`, DeBERTa's `pooler`, ModernBERT's
    `head`, ...).  Each name must be a unique suffix, as PEFT matches modules_to_save by suffix."""
    encoder = getattr(model, "base_model_prefix", "")
    names = [n for n, m in model.named_children() if n != encoder and any(True for _ in m.parameters())]
    all_names = [n for n, _ in model.named_modules()]
    for n in names:
        clash = [m for m in all_names if m.endswith(n) and not any(m == h or m.startswith(h + ".") for h in names)]
        if clash:
            raise LoraclsError(f"the head module {n!r} of this model is also the end of {clash[0]!r}, so PEFT "
                               "would save both; this architecture needs its own entry in loracls.families")
    return names


__all__ = ["AdapterLayout", "WholeModel", "GENERIC", "family_or_generic", "model_family", "layer_paths",
           "resolve_paths", "layout", "linear_names", "head_modules"]
