"""Exact trainable-parameter counts from a model's config alone: no weights are loaded or downloaded.

LoRA on a Linear(in, out) adds A (r x in) and B (out x r): r * (in + out) parameters, no bias.  Inside one encoder
layer of a BERT-family model (hidden size H, FFN size I):

    query, key, value, attention.output.dense   H -> H
    intermediate.dense                           H -> I
    output.dense (the FFN output)                I -> H

Heads, for K labels (see config.HEAD_CHOICES):

    model_type       native                         linear               native-lora
    bert             classifier H*K+K               same as native       LoRA r*(H+H) on the pooler dense
                     (pooler frozen, pretrained)                         + classifier H*K+K
    roberta,         classifier.dense H*H+H         out_proj H*K+K       LoRA r*(H+H) on classifier.dense
    xlm-roberta      + classifier.out_proj H*K+K                         + out_proj H*K+K

`base_total` is the parameter count of the plain `AutoModelForSequenceClassification` built from the config
(embeddings, layers, BERT's pooler, the head), computed arithmetically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from loracls.config import HEAD_CHOICES, TARGET_CHOICES, LoraSettings
from loracls.errors import LoraclsError

# The BERT-family layouts every part of loracls knows (counts here, heads in peft_format, the fast encoder).
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
ROBERTA_TYPES = ("roberta", "xlm-roberta")

# Target sets `enumerate_plans` tries, smallest first.  Extend freely: each entry is a tuple of canonical names.
CANDIDATE_TARGET_SETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("query", "key", "value"),
    ("query", "key", "value", "attention.output.dense"),
    ("query", "value", "intermediate.dense", "output.dense"),
    TARGET_CHOICES,
)
DEFAULT_RANKS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# Short names for tables.
_SHORT = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "attn_out",
          "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}


@dataclass
class Plan:
    """Where the trainable parameters of one LoRA setting go, and how they compare to the whole model."""

    lora: LoraSettings
    num_labels: int
    lora_by_target: dict[str, int]
    """Canonical target name -> LoRA parameters summed over all adapted layers."""
    head: int
    """Trainable head parameters (including the LoRA on the pooler / head dense for native-lora)."""
    trainable: int
    base_total: int
    """Parameters of the plain AutoModelForSequenceClassification (no LoRA)."""
    model_type: str = ""
    num_layers_adapted: int = 0
    shapes: dict[str, str] = field(default_factory=dict)
    """Target name -> how its count is made, e.g. '6*(768+768) x 12'."""
    head_shapes: list[tuple[str, str, int]] = field(default_factory=list)
    """(module, formula, params) for each trainable piece of the head."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base_total if self.base_total else 0.0

    @property
    def breakdown(self) -> dict[str, int]:
        """{target: params, ..., "head": params}, the form metrics.json stores."""
        return {**self.lora_by_target, "head": self.head}


# -- reading a config -------------------------------------------------------------------------------------------
def read_model_config(model: str, trust_remote_code: bool = False):
    """`transformers.AutoConfig.from_pretrained`; a folder holding only config.json is enough."""
    from transformers import AutoConfig

    text = str(model)
    p = Path(text).expanduser()
    looks_local = p.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        if not p.exists():
            raise LoraclsError(f"model folder {text!r} does not exist; pass an existing folder or a hub id")
        if p.is_dir() and not (p / "config.json").is_file():
            raise LoraclsError(f"model folder {text!r} has no config.json; point --model at a saved model folder")
        if p.is_file():
            raise LoraclsError(f"model {text!r} is a file, not a folder; pass the folder holding config.json")
    try:
        return AutoConfig.from_pretrained(str(p) if looks_local else text, trust_remote_code=trust_remote_code)
    except LoraclsError:
        raise
    except Exception as e:  # OSError (not found / offline), ValueError (bad or unknown config), JSON errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LoraclsError(f"cannot read the model config of {text!r}: {first}") from None


# -- counting ---------------------------------------------------------------------------------------------------
def _dims(model_config) -> dict[str, Any]:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LoraclsError(f"model type {model_type!r} is not supported; supported types: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)} (BERT and RoBERTa-family encoders)")
    try:
        return {
            "model_type": model_type,
            "H": int(model_config.hidden_size),
            "I": int(model_config.intermediate_size),
            "L": int(model_config.num_hidden_layers),
            "V": int(model_config.vocab_size),
            "P": int(model_config.max_position_embeddings),
            "T": int(getattr(model_config, "type_vocab_size", 0) or 0),
        }
    except (AttributeError, TypeError, ValueError) as e:
        raise LoraclsError(f"the model config lacks a size field ({e}); is it a BERT/RoBERTa config?") from None


def _target_dims(d: dict[str, Any]) -> dict[str, tuple[int, int]]:
    H, I = d["H"], d["I"]
    return {"query": (H, H), "key": (H, H), "value": (H, H), "attention.output.dense": (H, H),
            "intermediate.dense": (H, I), "output.dense": (I, H)}


def _base_total(d: dict[str, Any], K: int) -> int:
    H, I, L, V, P, T = d["H"], d["I"], d["L"], d["V"], d["P"], d["T"]
    embeddings = V * H + P * H + T * H + 2 * H
    layer = (4 * (H * H + H)      # query, key, value, attention.output.dense
             + 2 * H              # attention.output.LayerNorm
             + H * I + I          # intermediate.dense
             + I * H + H          # output.dense
             + 2 * H)             # output.LayerNorm
    if d["model_type"] == "bert":
        rest = (H * H + H) + (H * K + K)                  # pooler.dense + classifier
    else:
        rest = (H * H + H) + (H * K + K)                  # classifier.dense + classifier.out_proj
    return embeddings + L * layer + rest


def _head(d: dict[str, Any], K: int, head: str, r: int) -> list[tuple[str, str, int]]:
    H = d["H"]
    classifier = (f"{H}*{K}+{K}", H * K + K)
    dense = (f"{H}*{H}+{H}", H * H + H)
    lora_dense = (f"LoRA {r}*({H}+{H})", r * (H + H))
    if d["model_type"] == "bert":
        if head in ("native", "linear"):
            return [("classifier", *classifier)]
        return [("pooler.dense", *lora_dense), ("classifier", *classifier)]
    if head == "native":
        return [("classifier.dense", *dense), ("classifier.out_proj", *classifier)]
    if head == "linear":
        return [("classifier.out_proj", *classifier)]
    return [("classifier.dense", *lora_dense), ("classifier.out_proj", *classifier)]


def count(model_config, num_labels: int, lora: LoraSettings) -> Plan:
    """The exact trainable and total parameter counts of `lora` on the model `model_config` describes."""
    d = _dims(model_config)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise LoraclsError(f"the number of labels must be a whole number >= 1, got {num_labels!r}")
    if lora.head not in HEAD_CHOICES:
        raise LoraclsError(f"lora.head must be one of {', '.join(HEAD_CHOICES)}, got {lora.head!r}")
    r, H, L = lora.rank, d["H"], d["L"]
    if r > H:
        raise LoraclsError(f"lora.rank {r} exceeds the model's hidden size {H}; choose a rank <= {H}")
    if lora.layers is None:
        n_layers = L
    else:
        bad = [i for i in lora.layers if i >= L]
        if bad:
            raise LoraclsError(f"lora.layers {bad} out of range: the model has {L} layers (indices 0..{L - 1})")
        n_layers = len(lora.layers)
    dims = _target_dims(d)
    lora_by_target, shapes = {}, {}
    for t in lora.targets:
        i, o = dims[t]
        lora_by_target[t] = r * (i + o) * n_layers
        shapes[t] = f"{r}*({i}+{o}) x {n_layers}"
    head_parts = _head(d, num_labels, lora.head, r)
    head = sum(n for _, _, n in head_parts)
    return Plan(lora=lora, num_labels=num_labels, lora_by_target=lora_by_target, head=head,
                trainable=sum(lora_by_target.values()) + head, base_total=_base_total(d, num_labels),
                model_type=d["model_type"], num_layers_adapted=n_layers, shapes=shapes, head_shapes=head_parts)


def largest_rank(model_config, num_labels: int, lora: LoraSettings, budget: int) -> int:
    """The largest rank r (<= hidden size) whose plan has trainable <= budget; LoraclsError if r=1 does not fit."""
    H = _dims(model_config)["H"]
    one = count(model_config, num_labels, dataclasses.replace(lora, rank=1))
    if one.trainable > budget:
        raise LoraclsError(f"even rank 1 needs {one.trainable:,} trainable parameters, over the budget of "
                           f"{budget:,}; choose fewer targets or layers, or a smaller head (see `loracls plan`)")
    # trainable(r) is affine in r: fixed + slope * r.
    slope = count(model_config, num_labels, dataclasses.replace(lora, rank=2)).trainable - one.trainable
    fixed = one.trainable - slope
    r = H if slope <= 0 else min(H, max(1, (budget - fixed) // slope))
    while r > 1 and count(model_config, num_labels, dataclasses.replace(lora, rank=r)).trainable > budget:
        r -= 1  # defensive; the affine formula is exact
    return int(r)


def enumerate_plans(model_config, num_labels: int, budget: int | None, *, ranks: Iterable[int] = DEFAULT_RANKS,
                    heads: Iterable[str] = HEAD_CHOICES,
                    target_sets: Iterable[Iterable[str]] = CANDIDATE_TARGET_SETS,
                    base: LoraSettings | None = None) -> list[Plan]:
    """Every (target set, rank, head) plan on all layers with trainable <= budget (None: no limit), sorted by
    trainable descending, then fewer target types first.  alpha/dropout/rslora are copied from `base`."""
    base = base or LoraSettings()
    H = _dims(model_config)["H"]
    plans = []
    for targets in target_sets:
        for r in ranks:
            if r > H:
                continue
            for head in heads:
                lora = dataclasses.replace(base, rank=r, targets=list(targets), head=head, layers=None)
                plan = count(model_config, num_labels, lora)
                if budget is None or plan.trainable <= budget:
                    plans.append(plan)
    plans.sort(key=lambda p: (-p.trainable, len(p.lora.targets)))
    return plans


def check_budget(plan: Plan, budget: int | None) -> None:
    if budget is not None and plan.trainable > budget:
        raise LoraclsError(f"trainable parameters {plan.trainable:,} exceed --max-trainable {budget:,}; "
                           "lower --rank or targets (see `loracls plan`)")


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
    """A human table: LoRA per target type, the head, total trainable, base total and % of the model."""
    lora = plan.lora
    layers = "all" if lora.layers is None else ",".join(str(i) for i in lora.layers)
    header = (f"LoRA plan: rank {lora.rank}, alpha {lora.alpha:g}{' (rslora)' if lora.rslora else ''}, "
              f"head {lora.head}, {plan.num_labels} labels, layers {layers} ({plan.num_layers_adapted} adapted)")
    rows = [["part", "shape", "params"]]
    for t, n in plan.lora_by_target.items():
        rows.append([f"LoRA {t}", plan.shapes.get(t, ""), f"{n:,}"])
    for module, formula, n in plan.head_shapes:
        rows.append([f"head {module}", formula, f"{n:,}"])
    rows.append(["total trainable", "", f"{plan.trainable:,}"])
    rows.append(["base model total", "", f"{plan.base_total:,}"])
    rows.append(["trainable share", "", f"{plan.percent:.3f}%"])
    return header + "\n" + _table(rows, right={2})


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


__all__ = ["Plan", "SUPPORTED_MODEL_TYPES", "ROBERTA_TYPES", "CANDIDATE_TARGET_SETS", "DEFAULT_RANKS", "read_model_config", "count",
           "largest_rank", "enumerate_plans", "check_budget", "format_plan", "format_plans"]
