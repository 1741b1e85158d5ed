"""The portable LoRA targets of a model type with no row in loracls.families, inferred from the model itself.

The table's rows are the evidence for how encoder layers are laid out: a stack of identical blocks (an
nn.ModuleList as long as the config's num_hidden_layers, or parallel lists of attention and FFN blocks as in XLM),
and inside each block

    query, key, value     three linears named q/k/v (query, q_proj, q_lin, Wq, ...) side by side, or one fused
                          linear H -> 3H (ModernBERT's Wqkv, DeBERTa's in_proj)
    attention-output      the other linear of the attention block that writes back to the layer's width
    ffn-in                outside the attention block, width -> I (or 2I, gated), I != width
    ffn-out               outside the attention block, I -> width

Query, key and value are told apart by name alone (shapes cannot say which is which; q and k must read the same
width), the other roles by shape first (known on the meta device, so nothing is loaded) with names breaking
ties.  Where a role stays ambiguous (two candidates, as a gated FFN's gate_proj and up_proj) it is left out: the
user then names the module, and the error lists the layer's linears with their shapes.  Only nn.Linear counts:
loracls adapts those, and a Conv1d (SqueezeBERT) or a quantized linear (I-BERT) is no target.
"""

from __future__ import annotations

import re

import torch

from loracls.families import ALIASES, HIDDEN, INTERMEDIATE, Family, Target

# Name tokens (lower case, split at '_' and '.') that say which projection a linear is.  A name is "exactly" q when
# its tokens, less the filler words, are just one of these: `query_global` or `w2e_query` are no plain query.
_QKV_NAMES = {"query": ("q", "query", "wq"), "key": ("k", "key", "wk"), "value": ("v", "value", "wv")}
_FUSED_NAMES = ("qkv", "wqkv", "in_proj", "query_key_value", "c_attn", "qkv_proj")
_FILLER = {"proj", "lin", "linear", "to", "layer", "fc"}
_NOT_OUTPUT = {"q", "k", "v", "query", "key", "value", "pos", "rel", "global", "relative", "position"}
_OUTPUT_NAMES = {"o", "out", "output", "wo", "dense"}
_FFN_IN_NAMES = {"intermediate", "up", "in", "fc1", "lin1", "wi", "dense_h_to_4h", "w1", "dense1"}
_FFN_OUT_NAMES = {"output", "out", "down", "fc2", "lin2", "wo", "dense_4h_to_h", "w2", "dense2"}


def infer_family(model) -> Family:
    """A Family for a transformers model whose model type has no row: its encoder layers and the portable targets
    this module can identify in them (see the module docstring).  Works on a model built on the meta device."""
    config = model.config
    model_type = getattr(config, "model_type", None) or type(model).__name__
    lists = _layer_lists(model)
    if not lists:
        every = [f"{n} ({m.in_features}->{m.out_features})" for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear)]
        return Family(f"inferred:{model_type}", (model_type,), "", {}, layer_pattern=r"(?!)(\d+)", inferred=True,
                      layer_linears=tuple(every))
    parent, names = lists
    linears = {}  # layer-relative path -> (in, out)
    region_of = {}  # layer-relative path -> the list it lives in (XLM's attentions or ffns)
    for name in names:
        blocks = model.get_submodule(f"{parent}.{name}" if parent else name)
        # a target must be in every layer: Reformer's LSH layers have no key where its local ones do
        in_all = set.intersection(*({p for p, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
                                    for b in blocks))
        for path, m in blocks[0].named_modules():
            if path in in_all:
                linears[path] = (m.in_features, m.out_features)
                region_of[path] = name
    targets = _targets(linears, region_of if len(names) > 1 else None, config)
    rel = _relative(model, parent)
    body = "(?:" + "|".join(re.escape(n) for n in names) + ")" if len(names) > 1 else re.escape(names[0])
    pattern = (re.escape(rel) + r"\." if rel else "") + body + r"\.(\d+)"
    mapping = ", ".join(f"{a}={t.path}" for a, t in targets.items()) or "none"
    return Family(f"inferred:{model_type}", (model_type,), "", targets, layer_pattern=pattern, inferred=True,
                  layer_linears=tuple(f"{p} ({i}->{o})" for p, (i, o) in linears.items()),
                  notes=(f"model type {model_type!r} has no row in loracls' table; targets inferred from its layers: "
                         f"{mapping}",))


# -- the encoder layers -----------------------------------------------------------------------------------------
def _layer_lists(model) -> tuple[str, list[str]] | None:
    """(parent path, [list names]) of the encoder layers: the ModuleList(s) of identical blocks that hold linears,
    as long as num_hidden_layers where one is; sibling lists of that length (XLM's attentions and ffns) together."""
    found = []  # (path, length, linears inside)
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            n = sum(isinstance(x, torch.nn.Linear) for x in m.modules())
            if n:
                found.append((path, len(m), n))
    if getattr(model.config, "is_encoder_decoder", False):
        # BART, T5: the decoder's layers hold more linears (cross-attention), but LoRA goes where it goes on every
        # other model, in the encoder's layers
        found = [f for f in found if "encoder" in f[0].split(".")] or found
    if not found:
        return None
    depth = getattr(model.config, "num_hidden_layers", None)
    exact = [f for f in found if f[1] == depth] or [max(found, key=lambda f: (f[1], f[2]))]
    best = max(exact, key=lambda f: f[2])
    parent, _, name = best[0].rpartition(".")
    siblings = [f[0].rpartition(".")[2] for f in exact if f[0].rpartition(".")[0] == parent and f[1] == best[1]]
    if len(siblings) > 1 and _distinct_paths(model, parent, siblings):
        return parent, siblings
    return parent, [name]


def _distinct_paths(model, parent: str, names: list[str]) -> bool:
    """Whether the blocks of sibling lists name their linears apart (a layer-relative path must say which one)."""
    seen: set[str] = set()
    for name in names:
        paths = {p for p, m in model.get_submodule(f"{parent}.{name}.0").named_modules()
                 if isinstance(m, torch.nn.Linear)}
        if seen & paths:
            return False
        seen |= paths
    return True


def _relative(model, parent: str) -> str:
    """The layers' parent path inside the base model: PEFT's target regex and loracls' layer regex start there."""
    prefix = getattr(model, "base_model_prefix", "")
    if parent == prefix:
        return ""
    return parent.removeprefix(prefix + ".") if prefix and parent.startswith(prefix + ".") else \
        parent.partition(".")[2]


# -- the targets inside one layer -------------------------------------------------------------------------------
def _tokens(path: str) -> list[str]:
    return [t for t in re.split(r"[._]", path.rsplit(".", 1)[-1].lower()) if t]


def _plain(path: str) -> str:
    """The last name of a path, less filler words: 'q_proj' -> 'q', 'query' -> 'query', 'Wq' -> 'wq'."""
    return "_".join(t for t in _tokens(path) if t not in _FILLER)


def _one(candidates: list[str], prefer: set[str]) -> str | None:
    """The single candidate, or the single one whose name has a preferred token; None where that is ambiguous.
    A gated FFN's gate and up projections are two inputs of one role: neither is "the" ffn-in."""
    if any("gate" in _tokens(p) for p in candidates):
        return None
    if len(candidates) == 1:
        return candidates[0]
    named = [p for p in candidates if prefer & set(_tokens(p)) or prefer & set(p.lower().split("."))]
    return named[0] if len(named) == 1 else None


def _targets(linears: dict[str, tuple[int, int]], region_of: dict[str, str] | None, config) -> dict[str, Target]:
    """Alias -> Target for every portable target that shapes and names identify without doubt."""
    found = _qkv(linears)
    rest = list(linears)
    if found:  # the layer's width is what q reads; the attention output writes it back
        q = found["query"]
        width, fused = linears[q][0], found["key"] == q
        region = _region(q, region_of)
        inside = [p for p in linears if _in_region(p, region, region_of) and p not in found.values()]
        out = [p for p in inside if linears[p][1] == width and not _NOT_OUTPUT & set(_tokens(p))
               and (region or linears[p][0] == linears[q][1] // (3 if fused else 1))]
        attention_output = _one(out, _OUTPUT_NAMES)
        if attention_output:
            found["attention-output"] = attention_output
        rest = [p for p in linears if p not in found.values() and (not region or p not in inside)]
    else:  # no attention block (FNet's Fourier mixing): the width is the one most linears read
        widths = [i for i, _ in linears.values()]
        width = max(set(widths), key=widths.count) if widths else 0
    found.update(_ffn(linears, rest, width, getattr(config, "intermediate_size", None)))
    slots = {a: i for i, a in enumerate(_QKV_NAMES)} if found and found.get("key") != found.get("query") else {}
    return {a: Target(found[a], _dims(linears[found[a]], config), slots.get(a)) for a in ALIASES if a in found}


def _qkv(linears: dict[str, tuple[int, int]]) -> dict[str, str]:
    """query/key/value -> path: three linears named so, side by side, or one fused linear; else nothing."""
    named = {a: [p for p in linears if _plain(p) in names] for a, names in _QKV_NAMES.items()}
    fused = [p for p in linears if linears[p][1] == 3 * linears[p][0]
             and {_plain(p), p.rsplit(".", 1)[-1].lower()} & set(_FUSED_NAMES)]
    if all(len(v) == 1 for v in named.values()):
        q, k, v = (named[a][0] for a in _QKV_NAMES)
        if len({p.rpartition(".")[0] for p in (q, k, v)}) == 1 and linears[q][0] == linears[k][0]:
            return {"query": q, "key": k, "value": v}
    elif len(fused) == 1 and not any(named.values()):
        return {a: fused[0] for a in _QKV_NAMES}
    return {}


def _ffn(linears: dict[str, tuple[int, int]], rest: list[str], width: int, size: int | None) -> dict[str, str]:
    """ffn-in (width -> I, or 2I gated) and ffn-out (I -> width) among the linears outside the attention block;
    where several fit, those the config's intermediate_size describes, then names decide."""
    found = {}
    ffn_in = _one(_sized([p for p in rest if linears[p][0] == width and linears[p][1] != width],
                         lambda p: linears[p][1] in (size, 2 * (size or 0))), _FFN_IN_NAMES)
    inner = {linears[ffn_in][1], linears[ffn_in][1] // 2} if ffn_in else None
    ffn_out = _one(_sized([p for p in rest if linears[p][1] == width and linears[p][0] != width
                           and (inner is None or linears[p][0] in inner)], lambda p: linears[p][0] == size),
                   _FFN_OUT_NAMES)
    if ffn_in:
        found["ffn-in"] = ffn_in
    if ffn_out:
        found["ffn-out"] = ffn_out
    return found


def _sized(candidates: list[str], of_config_size) -> list[str]:
    """The candidates the config's intermediate_size describes, where there are any (Xmod's adapters are no FFN)."""
    return [p for p in candidates if of_config_size(p)] or candidates


def _region(q: str, region_of: dict[str, str] | None) -> str:
    """The attention block: the layer's child that holds q (BERT's 'attention'), or q's own list (XLM)."""
    if region_of is not None:
        return region_of[q]
    return q.split(".")[0] if "." in q else ""


def _in_region(path: str, region: str, region_of: dict[str, str] | None) -> bool:
    if region_of is not None:
        return region_of[path] == region
    return not region or path.startswith(region + ".")


def _dims(shape: tuple[int, int], config) -> tuple[str, str]:
    """(in, out) in the table's terms where they are the config's sizes, else the number itself."""
    h = getattr(config, "hidden_size", None)
    i = getattr(config, "intermediate_size", None)
    names = {h: HIDDEN, i: INTERMEDIATE} if h is not None else {}
    if h is not None:
        names.setdefault(3 * h, "qkv")
    if i is not None:
        names.setdefault(2 * i, "gated_intermediate")
    return tuple(names.get(n, str(n)) for n in shape)  # type: ignore[return-value]


__all__ = ["infer_family"]
