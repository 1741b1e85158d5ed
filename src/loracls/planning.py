"""Exact trainable-parameter counts from a model's config alone: no weights are loaded or downloaded.

Any architecture: the sequence-classification model is built from config.json on PyTorch's meta device (shapes,
no memory), PEFT injects LoRA there exactly as training will, and the trainable tensors are counted.  That is
PEFT's own count on the real model.

The BERT and RoBERTa families also have a closed form, used first because it is instant (budget searches count
hundreds of settings).  LoRA on a Linear(in, out) adds A (r x in) and B (out x r): r * (in + out), no bias.
Inside one layer (hidden H, FFN I): query, key, value and attention-output are H -> H, ffn-in H -> I, ffn-out
I -> H.  Heads, for K labels (see families.HeadLayout):

    family    native                          linear               native-lora
    bert      classifier H*K+K                same as native       LoRA r*(H+H) on the pooler dense
              (pooler frozen, pretrained)                          + classifier H*K+K
    roberta   classifier.dense H*H+H          out_proj H*K+K       LoRA r*(H+H) on classifier.dense
              + classifier.out_proj H*K+K                          + out_proj H*K+K

`base_total` is the parameter count of the plain `AutoModelForSequenceClassification` built from the config.
The tests hold both forms to PEFT's count on real models.  A full fine-tune (method full) trains all of it: its
count is `base_total`, split into the encoder and the head, from the same model on the meta device.

Also here: `--rank auto` (the largest rank within a budget) and everything `loracls plan` prints.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from loracls import families
from loracls.config import HEAD_CHOICES, LoraSettings
from loracls.errors import LoraclsError, first_line
from loracls.families import ALIASES, ALL_LINEAR, TARGET_SETS

DEFAULT_RANKS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)

_SHORT = {"query": "q", "key": "k", "value": "v", "attention-output": "attn_out", "ffn-in": "ffn_in",
          "ffn-out": "ffn_out"}


@dataclass
class Plan:
    """Where the trainable parameters of one LoRA setting go, and how they compare to the whole model."""

    lora: LoraSettings
    num_labels: int
    lora_by_target: dict[str, int]
    """Target (alias, or module path for all-linear and raw names) -> LoRA parameters over all adapted layers."""
    head: int
    """Trainable head parameters (including the LoRA on the pooler / head dense for native-lora)."""
    trainable: int
    base_total: int
    """Parameters of the plain AutoModelForSequenceClassification (no LoRA)."""
    model_type: str = ""
    num_layers_adapted: int = 0
    shapes: dict[str, str] = field(default_factory=dict)
    """Target -> how its count is made, e.g. '6*(768+768) x 12'."""
    head_shapes: list[tuple[str, str, int]] = field(default_factory=list)
    """(module, formula, params) for each trainable piece of the head."""
    notes: list[str] = field(default_factory=list)
    encoder: int = 0
    """Encoder parameters trained in full (method full: embeddings and every layer); 0 under LoRA."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base_total if self.base_total else 0.0

    @property
    def breakdown(self) -> dict[str, int]:
        """{target: params, ..., "head": params} ({"encoder": params, "head": params} for a full fine-tune), the
        form metrics.json stores."""
        return {**self.lora_by_target, **({"encoder": self.encoder} if self.encoder else {}), "head": self.head}

    @property
    def total(self) -> int:
        return self.trainable


# -- checks shared by both counts --------------------------------------------------------------------------------
def _check(model_config, num_labels: int, lora: LoraSettings) -> int:
    """Validate the setting against the config; returns how many layers get LoRA."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise LoraclsError(f"the number of labels must be a whole number >= 1, got {num_labels!r}")
    if lora.head not in HEAD_CHOICES:
        raise LoraclsError(f"lora.head must be one of {', '.join(HEAD_CHOICES)}, got {lora.head!r}")
    return check_lora_fits(model_config, lora)


def check_lora_fits(model_config, lora: LoraSettings) -> int:
    """Ranks and layer indices against the model (for plan and for every run); returns how many layers get LoRA."""
    try:
        H, L = int(model_config.hidden_size), int(model_config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        raise LoraclsError(f"the config of model type {getattr(model_config, 'model_type', None)!r} has no "
                           "hidden_size / num_hidden_layers; is it a transformer encoder?") from None
    if lora.full:  # no LoRA to fit: the rank is ignored, and the config refuses layers and layer ranks
        return 0
    if lora.rank > H:
        raise LoraclsError(f"lora.rank {lora.rank} exceeds the model's hidden size {H}; choose a rank <= {H}")
    bad = [i for i in lora.layers or [] if i >= L]
    if bad:
        raise LoraclsError(f"lora.layers: layer {', '.join(map(str, bad))} out of range, the model has {L} layers "
                           f"(indices 0..{L - 1}); fix the layer list")
    # a rank for a layer that does not exist or gets no LoRA would be silently ignored by PEFT's rank_pattern
    ranked = lora.layer_ranks or {}
    bad = [i for i in ranked if i >= L or (lora.layers is not None and i not in lora.layers)]
    if bad:
        raise LoraclsError(f"lora.layer_ranks names layer(s) {bad} that get no LoRA (the model has {L} layers, "
                           f"indices 0..{L - 1}{'' if lora.layers is None else f'; lora.layers is {lora.layers}'}); "
                           "fix the layer:rank pairs")
    big = {i: r for i, r in ranked.items() if r > H}
    if big:
        raise LoraclsError(f"lora.layer_ranks {big} exceed the model's hidden size {H}; choose ranks <= {H}")
    return L if lora.layers is None else len(lora.layers)


def _notes(fam: families.Family, lora: LoraSettings) -> list[str]:
    """What `plan` and the run header say about the family beyond the counts (an inferred mapping, fused or
    shared weights)."""
    chosen = [t for t in lora.targets if t in fam.targets]
    fused = [aliases for aliases in fam.fused(chosen).values() if len(aliases) > 1] if chosen else []
    notes = list(fam.notes) if fam.inferred else []
    notes += [f"{', '.join(a)} share one fused linear ({fam.targets[a[0]].path}): adapted once" for a in fused]
    if fam.shared_layers:
        notes.append(f"{fam.name} shares its layer weights: LoRA is counted once for all layers")
    return notes


# -- the closed form (BERT and RoBERTa families) -----------------------------------------------------------------
def _closed_form(model_config, num_labels: int, lora: LoraSettings, n_layers: int) -> Plan | None:
    fam = families.family_of(model_config)
    if fam is None or not fam.closed_form or any(t not in ALIASES and t != ALL_LINEAR for t in lora.targets) \
            or lora.method != "lora" or lora.layer_ranks:
        return None  # DoRA and per-layer ranks: counted by PEFT itself
    H, K, r = int(model_config.hidden_size), num_labels, lora.rank
    aliases = list(ALIASES) if lora.targets == [ALL_LINEAR] else lora.targets
    lora_by_target, shapes = {}, {}
    for t in aliases:
        i, o = (families.dim(model_config, d) for d in fam.targets[t].dims)
        lora_by_target[t] = r * (i + o) * n_layers
        shapes[t] = f"{r}*({i}+{o}) x {n_layers}"
    head = fam.head
    dense = (head.dense, f"{H}*{H}+{H}", H * H + H)
    out = (head.out, f"{H}*{K}+{K}", H * K + K)
    lora_dense = (head.dense, f"LoRA {r}*({H}+{H})", r * (H + H))
    if lora.head == "native-lora":
        parts = [lora_dense, out]
    elif lora.head == "native" and not head.dense_pretrained:
        parts = [dense, out]
    else:
        parts = [out]
    return Plan(lora=lora, num_labels=K, lora_by_target=lora_by_target, head=sum(p[2] for p in parts),
                trainable=sum(lora_by_target.values()) + sum(p[2] for p in parts),
                base_total=_bert_base_total(model_config, K), model_type=model_config.model_type,
                num_layers_adapted=n_layers, shapes=shapes, head_shapes=parts)


def _bert_base_total(c, K: int) -> int:
    H, I, L = int(c.hidden_size), int(c.intermediate_size), int(c.num_hidden_layers)
    V, P, T = int(c.vocab_size), int(c.max_position_embeddings), int(getattr(c, "type_vocab_size", 0) or 0)
    embeddings = V * H + P * H + T * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H  # q,k,v,attn-out; LN; FFN; LN
    return embeddings + L * layer + (H * H + H) + (H * K + K)  # + pooler (BERT) or classifier.dense (RoBERTa)


# -- any architecture: PEFT on the meta device -------------------------------------------------------------------
def meta_model(model_config, num_labels: int):
    """AutoModelForSequenceClassification built from the config on the meta device: every shape, no memory."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(model_config)
    cfg.num_labels = num_labels
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise LoraclsError(f"transformers cannot build a sequence classifier for model type "
                           f"{getattr(model_config, 'model_type', None)!r} ({first_line(e)})") from None


def _peft_count(model_config, num_labels: int, lora: LoraSettings, n_layers: int) -> Plan:
    from loracls import peft_format, placement

    model = meta_model(model_config, num_labels)
    base_total = sum(p.numel() for p in model.parameters())
    fam = placement.model_family(model)
    lay = placement.layout(lora, model_config, placement.linear_names(model), placement.head_modules(model), fam)
    # PiSSA trains the same tensors as LoRA; its SVD needs real weights, which the meta device has not
    peft_model = peft_format.inject(model, dataclasses.replace(lora, init="kaiming"), lay)
    alias_of = {t.path: a for a, t in reversed(fam.targets.items())}
    for path, aliases in fam.fused(list(fam.targets)).items():
        alias_of[path] = "+".join(a for a in aliases if a in lora.targets or lora.targets == [ALL_LINEAR])
    lora_by_target: dict[str, int] = {}
    dims: dict[str, list[int]] = {}  # target -> [in, out, modules]
    head_parts: dict[str, int] = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        name = peft_format.saved_name(name).removeprefix("base_model.model.")
        path = next((q for q in lay.paths if f".{q}.lora_" in f".{name}"), None)
        if path is not None:
            key = alias_of.get(path) or path
            lora_by_target[key] = lora_by_target.get(key, 0) + p.numel()
            d = dims.setdefault(key, [0, 0, 0])
            if ".lora_A." in name:
                d[0], d[2] = p.shape[1], d[2] + 1
            else:
                d[1] = p.shape[0]
        else:
            module = name.rsplit(".", 1)[0].replace(".lora_A", "").replace(".lora_B", "")
            head_parts[module] = head_parts.get(module, 0) + p.numel()
    head = sum(head_parts.values())
    return Plan(lora=lora, num_labels=num_labels, lora_by_target=lora_by_target, head=head,
                trainable=sum(lora_by_target.values()) + head, base_total=base_total,
                model_type=getattr(model_config, "model_type", ""), num_layers_adapted=n_layers,
                shapes={k: f"{lora.rank}*({i}+{o}) x {m}" for k, (i, o, m) in dims.items()},
                head_shapes=[(m, "" if "LoRA" not in m else "LoRA", n) for m, n in head_parts.items()],
                notes=_notes(fam, lora))


def _full_count(model_config, num_labels: int, lora: LoraSettings) -> Plan:
    """A full fine-tune: every parameter of the plain classifier, the encoder (transformers' base_model) apart from
    the head (the rest: BERT's classifier, RoBERTa's classifier.dense and out_proj, ...)."""
    model = meta_model(model_config, num_labels)
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.base_model.parameters()) if model.base_model is not model else 0
    head_parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()
                  if m is not model.base_model}
    return Plan(lora=lora, num_labels=num_labels, lora_by_target={}, head=total - encoder, trainable=total,
                base_total=total, model_type=getattr(model_config, "model_type", ""), encoder=encoder,
                head_shapes=[(name, "", n) for name, n in head_parts.items() if n])


def count(model_config, num_labels: int, lora: LoraSettings) -> Plan:
    """The exact trainable and total parameter counts of `lora` on the model `model_config` describes."""
    n_layers = _check(model_config, num_labels, lora)
    if lora.full:
        return _full_count(model_config, num_labels, lora)
    plan = _closed_form(model_config, num_labels, lora, n_layers)
    return plan if plan is not None else _peft_count(model_config, num_labels, lora, n_layers)


def largest_rank(model_config, num_labels: int, lora: LoraSettings, budget: int) -> int:
    """The largest rank r (<= hidden size) whose plan has trainable <= budget; LoraclsError if r=1 does not fit."""
    if lora.full:
        raise LoraclsError("--rank auto picks a LoRA rank, and --method full has no LoRA; drop --rank auto")
    H = int(model_config.hidden_size)
    one = count(model_config, num_labels, dataclasses.replace(lora, rank=1))
    if one.trainable > budget:
        raise LoraclsError(f"even rank 1 needs {one.trainable:,} trainable parameters, over the budget of "
                           f"{budget:,}; choose fewer targets or layers, or a smaller head (see `loracls plan`)")
    # trainable(r) is affine in r: fixed + slope * r.
    slope = count(model_config, num_labels, dataclasses.replace(lora, rank=2)).trainable - one.trainable
    fixed = one.trainable - slope
    return int(H if slope <= 0 else min(H, max(1, (budget - fixed) // slope)))


def enumerate_plans(model_config, num_labels: int, budget: int | None, *, ranks: Iterable[int] = DEFAULT_RANKS,
                    heads: Iterable[str] | None = None,
                    target_sets: Iterable[Iterable[str]] = TARGET_SETS.values(),
                    base: LoraSettings | None = None) -> list[Plan]:
    """Every (target set, rank, head) plan on all layers with trainable <= budget (None: no limit), sorted by
    trainable descending, then fewer target types first.  alpha/dropout/rslora are copied from `base`.  A count
    is affine in the rank, so each (target set, head) is counted at ranks 1 and 2 only."""
    base = base or LoraSettings()
    fam = families.family_of(model_config)
    if heads is None:
        heads = HEAD_CHOICES if fam is not None and fam.head is not None else ("native",)
    H = int(model_config.hidden_size)
    plans, seen = [], set()
    for targets in target_sets:
        for head in heads:
            try:
                one, two = (count(model_config, num_labels, dataclasses.replace(
                    base, rank=r, targets=list(targets), head=head, layers=None)) for r in (1, 2))
            except LoraclsError:
                continue  # a target this family lacks
            key = (tuple(sorted(one.lora_by_target.items())), one.head, head)
            if key in seen:  # e.g. ModernBERT's (query, value) and (query, key, value): one fused module
                continue
            seen.add(key)
            slope = two.trainable - one.trainable
            for r in ranks:
                if r > H or budget is not None and one.trainable + slope * (r - 1) > budget:
                    continue
                plans.append(_scaled(one, two, r))
    plans.sort(key=lambda p: (-p.trainable, len(p.lora.targets)))
    return plans


def _scaled(one: Plan, two: Plan, r: int) -> Plan:
    """The plan at rank r from those at ranks 1 and 2 (every LoRA count is linear in r)."""
    lora = dataclasses.replace(one.lora, rank=r)
    by_target = {k: v + (two.lora_by_target[k] - v) * (r - 1) for k, v in one.lora_by_target.items()}
    head = one.head + (two.head - one.head) * (r - 1)
    return dataclasses.replace(one, lora=lora, lora_by_target=by_target, head=head,
                               trainable=sum(by_target.values()) + head, shapes={}, head_shapes=[])


def check_budget(plan: Plan, budget: int | None) -> None:
    if budget is not None and plan.trainable > budget:
        fix = ("a full fine-tune trains every parameter: use --method lora, or raise the budget" if plan.lora.full
               else "lower --rank or targets (see `loracls plan`)")
        raise LoraclsError(f"trainable parameters {plan.trainable:,} exceed --max-trainable {budget:,}; {fix}")


# -- the plan command -------------------------------------------------------------------------------------------
def labels_from_data(config, *, hub: bool = False, allow_pickle: bool = False) -> tuple[int, str]:
    """(classes, task) of the config's training data, the task as data.task and the data decide it (auto: multi-
    label for lists of labels).  `plan` reads only a local file (hub=False: it never reaches for the hub);
    training and sweeps, which read the data anyway, may read a hub dataset too."""
    from loracls.data import read_examples, read_options

    train = config.data.train
    if not train or not (hub or Path(train).expanduser().is_file()):
        raise LoraclsError("the number of classes is unknown without a local training file; pass --num-labels K")
    examples, labels = read_examples(train, allow_pickle=allow_pickle, **read_options(config.data))
    return len(labels), examples.reading["task"]


def with_auto_rank(config, model_config, num_labels: int, budget: int | None):
    """The config with lora.rank set to the largest that fits `budget` (`--rank auto`)."""
    if budget is None:
        raise LoraclsError("--rank auto needs --budget N (the trainable-parameter budget)")
    best = largest_rank(model_config, num_labels, config.lora, budget)
    return config.with_overrides({"lora.rank": best})


def describe(config, model_config, num_labels: int, *, budget: int | None, enumerate_all: bool, limit: int) -> str:
    """What `loracls plan` prints: one plan's breakdown, or with enumerate_all every plan within the budget."""
    if num_labels < 1:
        raise LoraclsError("--num-labels must be at least 1")
    if enumerate_all and not config.lora.full:  # a full fine-tune has one plan: it is counted and checked below
        plans = enumerate_plans(model_config, num_labels, budget, base=config.lora)
        if not plans:
            raise LoraclsError(f"no configuration fits a budget of {budget:,}; the head alone needs more")
        return format_plans(plans, limit=limit)
    p = count(model_config, num_labels, config.lora)
    text = format_plan(p)
    check_budget(p, budget)
    return text


# -- formatting -------------------------------------------------------------------------------------------------
def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _targets_short(targets: Iterable[str]) -> str:
    return ",".join(_SHORT.get(t, t) for t in targets)


def format_plan(plan: Plan) -> str:
    """A human table: LoRA per target, the head, total trainable, base total and % of the model."""
    lora = plan.lora
    layers = "all" if lora.layers is None else ",".join(str(i) for i in lora.layers)
    if lora.full:
        header = f"full fine-tune: every parameter of the encoder and the head trains, {plan.num_labels} labels"
    else:
        header = (f"LoRA plan: rank {lora.rank}, alpha {lora.alpha:g}{' (rslora)' if lora.rslora else ''}, "
                  f"head {lora.head}, {plan.num_labels} labels, layers {layers} ({plan.num_layers_adapted} adapted)")
    rows = [["part", "shape", "params"]]
    if plan.encoder:
        rows.append(["encoder (embeddings and all layers)", "", f"{plan.encoder:,}"])
    for t, n in plan.lora_by_target.items():
        rows.append([f"LoRA {t}", plan.shapes.get(t, ""), f"{n:,}"])
    for module, formula, n in plan.head_shapes:
        rows.append([f"head {module}", formula, f"{n:,}"])
    rows.append(["total trainable", "", f"{plan.trainable:,}"])
    rows.append(["base model total", "", f"{plan.base_total:,}"])
    rows.append(["trainable share", "", f"{plan.percent:.3f}%"])
    return "\n".join([header, _table(rows, right={2})] + [f"note: {n}" for n in plan.notes])


def format_plans(plans: list[Plan], limit: int = 30) -> str:
    if not plans:
        return "no plan fits the budget; raise --max-trainable"
    rows = [["#", "targets", "rank", "head", "trainable", "% of model"]]
    for i, p in enumerate(plans[:limit], 1):
        rows.append([str(i), _targets_short(p.lora.targets), str(p.lora.rank), p.lora.head,
                     f"{p.trainable:,}", f"{p.percent:.3f}%"])
    text = _table(rows, right={0, 2, 4, 5})
    if len(plans) > limit:
        text += f"\n... {len(plans) - limit} more plans with fewer trainable parameters"
    return text


__all__ = ["Plan", "DEFAULT_RANKS", "count", "meta_model", "largest_rank", "enumerate_plans", "check_budget",
           "labels_from_data", "with_auto_rank", "describe", "format_plan", "format_plans"]
