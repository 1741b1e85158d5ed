"""The one table of architecture facts: which model types loracls knows, where LoRA may go in each, and the heads.

Everything else (config, plan, placement, both backends, max_positions) reads this table; supporting a new
encoder family means adding a row here.  A model type with no row gets its targets inferred from its layers
(loracls.target_inference): the rows below are the layouts that inference generalizes.

LoRA targets have portable names, the same for every family:

    query, key, value     the attention input projections (aliases q, k, v)
    attention-output      the attention output projection
    ffn-in, ffn-out       the feed-forward block's two projections
    all-linear            every linear layer inside the encoder layers (never the head, the pooler or embeddings)

Each family maps them to its own module paths inside one encoder layer (BERT `attention.self.query`, DistilBERT
`attention.q_lin`, DeBERTa `attention.self.query_proj`, MPNet `attention.attn.q`, ...).  A target that is no
alias is a raw module-name suffix, matched inside the encoder layers: that reaches any linear a table row does
not name (DeBERTa's `pos_key_proj`, or a model type with no row at all).

ModernBERT projects q, k and v with one fused linear (`attn.Wqkv`): any of query/key/value adapts that whole
module, and `plan` says so.  ALBERT shares one set of layer weights across all its layers, so LoRA on it is shared
too and `--layers` cannot pick layers.

Head variants (`--head`): `native` trains the architecture's own head, found from the model itself (every
top-level module of the sequence-classification model outside the pretrained encoder: `classifier`,
`pre_classifier`, `pooler`, `head`, `score`, ...).  `linear` and `native-lora` rework a two-layer head and are
defined where `head` below names its layout:

    family    dense (tanh)           out                   dense pretrained
    bert      bert.pooler.dense      classifier            yes: the pooler comes with the checkpoint, frozen
                                                                (under method full it trains, as every weight)
    roberta   classifier.dense       classifier.out_proj   no: a new layer, trained by `native`
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loracls.errors import LoraclsError

ALIASES = ("query", "key", "value", "attention-output", "ffn-in", "ffn-out")
ALL_LINEAR = "all-linear"
# The target sets `loracls plan --budget N` (with no --rank or --targets) and `loracls sweep` try, smallest first,
# by the name a sweep records (a continued sweep must find the same names).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q,v": ("query", "value"),
    "q,k,v": ("query", "key", "value"),
    "q,k,v,o": ("query", "key", "value", "attention-output"),
    "q,v,ffn": ("query", "value", "ffn-in", "ffn-out"),
    "all-linear": (ALL_LINEAR,),
}
# Other spellings of the aliases.  The dotted BERT paths are what config.yaml of runs before the table held.
SPELLINGS = {
    "q": "query", "k": "key", "v": "value",
    "attention_output": "attention-output", "attn_out": "attention-output", "attn-out": "attention-output",
    "attention.output": "attention-output", "attention.output.dense": "attention-output",
    "ffn_in": "ffn-in", "intermediate": "ffn-in", "intermediate.dense": "ffn-in",
    "ffn_out": "ffn-out", "output": "ffn-out", "output.dense": "ffn-out",
    "all_linear": ALL_LINEAR,
}
# A module name, as the refusals list them: dotted parts, which may start with a layer's index inside its block
# (Funnel's '0.attention.q_head'), but some letter somewhere (a bare number is no module).
_RAW = re.compile(r"(?=[\w.]*[A-Za-z])\w+(?:\.\w+)*\Z", re.ASCII)

HIDDEN, INTERMEDIATE = "hidden", "intermediate"


@dataclass(frozen=True)
class Target:
    """Where one portable target lives in one family's encoder layer."""

    path: str
    """Module path inside one encoder layer, e.g. 'attention.self.query'."""
    dims: tuple[str, str]
    """(in, out) features: HIDDEN or INTERMEDIATE (the config's hidden / intermediate size)."""
    qkv_slot: int | None = None
    """Block of the [q; k; v] stack this projection is (0, 1, 2): the fast backend fuses the three."""


@dataclass(frozen=True)
class HeadLayout:
    """A two-layer classification head, out(tanh(dense(h0))): what the linear and native-lora variants rework."""

    dense: str
    out: str
    dense_pretrained: bool
    """True when dense comes with the checkpoint and stays frozen under the native head (BERT's pooler)."""
    input_dropout: bool
    """Dropout on h0 before dense (RoBERTa's classification head; BERT's pooler has none)."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer: str
    """Module path of encoder layer {} inside the base model, e.g. 'encoder.layer.{}'."""
    targets: dict[str, Target]
    """Portable alias -> where it lives.  Aliases a family lacks are refused with the family's choices."""
    head: HeadLayout | None = None
    position_offset: bool = False
    """Positions are numbered from pad_token_id + 1 (RoBERTa): that many fewer usable positions."""
    shared_layers: bool = False
    """One set of layer weights serves every layer (ALBERT): LoRA is shared, --layers is refused."""
    fast: bool = False
    """loracls' fast backend implements this family's layout (backends/fast)."""
    closed_form: bool = False
    """`loracls plan` counts this family by formula (BERT layer layout and a known head), not by building it."""
    ort_fusion: str | None = None
    """The model_type under which ONNX Runtime's transformer optimizer fuses this family's exported graph."""
    prefix: str | None = None
    """The base model's attribute in the sequence-classification model (transformers' base_model_prefix), where
    the fast backend needs it to name tensors as PEFT does."""
    layer_pattern: str | None = None
    """A regex for the layer path when no fixed format fits (an inferred family, the generic fallback)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    inferred: bool = False
    """No table row: loracls.target_inference read this family off the model itself."""
    layer_linears: tuple[str, ...] = ()
    """An inferred family's linears of one encoder layer, 'path (in->out)': what the user may name instead."""

    @property
    def layer_regex(self) -> str:
        """Regex of one layer's module path; its one group is the layer index."""
        return self.layer_pattern or re.escape(self.layer).replace(r"\{\}", r"(\d+)")

    def fused(self, aliases: list[str]) -> dict[str, list[str]]:
        """Module path -> the aliases it serves, for the chosen aliases (ModernBERT's Wqkv serves q, k and v)."""
        out: dict[str, list[str]] = {}
        for a in aliases:
            out.setdefault(self.targets[a].path, []).append(a)
        return out


def _bert_targets(attention: str = "attention.self", names=("query", "key", "value"),
                  attention_output: str = "attention.output.dense", ffn_in: str = "intermediate.dense",
                  ffn_out: str = "output.dense") -> dict[str, Target]:
    q, k, v = (f"{attention}.{n}" for n in names)
    return {"query": Target(q, (HIDDEN, HIDDEN), 0), "key": Target(k, (HIDDEN, HIDDEN), 1),
            "value": Target(v, (HIDDEN, HIDDEN), 2), "attention-output": Target(attention_output, (HIDDEN, HIDDEN)),
            "ffn-in": Target(ffn_in, (HIDDEN, INTERMEDIATE)), "ffn-out": Target(ffn_out, (INTERMEDIATE, HIDDEN))}


_BERT_LAYER = "encoder.layer.{}"
_BERT_HEAD = HeadLayout(dense="bert.pooler.dense", out="classifier", dense_pretrained=True, input_dropout=False)
_ROBERTA_HEAD = HeadLayout(dense="classifier.dense", out="classifier.out_proj", dense_pretrained=False,
                           input_dropout=True)
_WQKV = "attn.Wqkv"

FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), _BERT_LAYER, _bert_targets(), head=_BERT_HEAD, fast=True, prefix="bert",
           closed_form=True, ort_fusion="bert"),
    Family("roberta", ("roberta", "xlm-roberta", "camembert"), _BERT_LAYER, _bert_targets(), head=_ROBERTA_HEAD,
           position_offset=True, fast=True, prefix="roberta", closed_form=True, ort_fusion="bert"),
    Family("electra", ("electra",), _BERT_LAYER, _bert_targets()),
    Family("distilbert", ("distilbert",), "transformer.layer.{}",
           _bert_targets("attention", ("q_lin", "k_lin", "v_lin"), "attention.out_lin", "ffn.lin1", "ffn.lin2")),
    Family("deberta-v2", ("deberta-v2",), _BERT_LAYER,
           _bert_targets("attention.self", ("query_proj", "key_proj", "value_proj")),
           notes=("DeBERTa's relative-position projections (pos_key_proj, pos_query_proj) are reached by "
                  "all-linear or by name",)),
    Family("mpnet", ("mpnet",), _BERT_LAYER,
           _bert_targets("attention.attn", ("q", "k", "v"), "attention.attn.o"), position_offset=True),
    Family("albert", ("albert",), "encoder.albert_layer_groups.{}.albert_layers.0",
           _bert_targets("attention", ("query", "key", "value"), "attention.dense", "ffn", "ffn_output"),
           shared_layers=True),
    Family("modernbert", ("modernbert",), "layers.{}",
           {"query": Target(_WQKV, (HIDDEN, "qkv")), "key": Target(_WQKV, (HIDDEN, "qkv")),
            "value": Target(_WQKV, (HIDDEN, "qkv")), "attention-output": Target("attn.Wo", (HIDDEN, HIDDEN)),
            "ffn-in": Target("mlp.Wi", (HIDDEN, "gated_intermediate")),
            "ffn-out": Target("mlp.Wo", (INTERMEDIATE, HIDDEN))},
           notes=("query, key and value share one fused linear (attn.Wqkv): any of them adapts all three",)),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of(model_config) -> Family | None:
    """The table row of a transformers config (or model_type string); None for a model type with no row."""
    model_type = model_config if isinstance(model_config, str) else getattr(model_config, "model_type", None)
    return _BY_TYPE.get(model_type)


def known_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def normalize_targets(targets: list[str] | tuple[str, ...] | str) -> list[str]:
    """User spellings ('q,k,v', 'attn_out', 'Wqkv', ...) -> aliases in table order, then raw module-name
    suffixes in the order given; 'all-linear' stands alone."""
    if isinstance(targets, str):
        targets = targets.split(",")
    canon: list[str] = []
    for t in targets:
        t = str(t).strip()
        if not t:
            continue
        t = SPELLINGS.get(t, SPELLINGS.get(t.lower(), t))
        if t not in ALIASES and t != ALL_LINEAR and not _RAW.match(t):
            raise LoraclsError(f"LoRA target {t!r} is neither a target name ({', '.join(ALIASES)}, {ALL_LINEAR}) "
                               "nor a module name; pass e.g. --targets query,value")
        if t not in canon:
            canon.append(t)
    if not canon:
        raise LoraclsError("no LoRA targets given; pass e.g. --targets query,key,value")
    if ALL_LINEAR in canon:
        return [ALL_LINEAR]
    return [a for a in ALIASES if a in canon] + [t for t in canon if t not in ALIASES]


NO_POSITION_LIMIT = 2**31 - 1


def max_positions(model_config) -> int:
    """Longest input the model's position embeddings allow (RoBERTa-like families reserve pad_token_id + 1).  A
    model with relative positions only says so with a value below 1 (XLNet's -1): no limit."""
    n = int(getattr(model_config, "max_position_embeddings", 512) or 512)
    if n < 1:
        return NO_POSITION_LIMIT
    fam = family_of(model_config)
    if fam is not None and fam.position_offset:
        n -= int(getattr(model_config, "pad_token_id", 0) or 0) + 1
    return n


def dim(model_config, name: str) -> int:
    """A target's in/out features (HIDDEN, INTERMEDIATE, ModernBERT's fused sizes, or an inferred family's number)
    from the config."""
    if name.isdigit():
        return int(name)
    h = int(model_config.hidden_size)
    i = int(getattr(model_config, "intermediate_size", 0) or getattr(model_config, "hidden_dim", 0) or 0)
    return {HIDDEN: h, INTERMEDIATE: i, "qkv": 3 * h, "gated_intermediate": 2 * i}[name]
