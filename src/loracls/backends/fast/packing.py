"""Batches for the fast backend: real tokens packed into rows, padding only where attention needs it.

Every token-wise op runs on the N real tokens of a batch packed into [N, H] rows; only attention sees a padded
layout.  `collate` builds, on the host from Python ints, the packed ids and every index the forward needs, and
moves them to the device in one copy, so the forward never syncs.  Under the CPU policy a padded batch's examples
are sorted by length and attend in contiguous groups, each padded to its own longest (`attention_groups` picks
the grouping of least cost); logits come back in the caller's order.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from loracls.backends.fast.policy import ExecutionPolicy
from loracls.errors import LoraclsError
from loracls.models import PairIds, token_types

# CPU: the examples of a padded batch are sorted by length and attention runs on contiguous groups of them, each
# padded to its own longest.  A group costs about m * L^2 * H (m examples of padded length L) plus a fixed
# GROUP_COST (the extra ops of one more group, forward and backward), in the same units; collate picks the grouping
# of least total cost.  (Measured with MiniLM on one CPU thread; the split barely moves around the optimum.)
GROUP_COST = 1_000_000


class PackLayout(NamedTuple):
    """What collate needs to know of the model."""
    pad_id: int
    pos_offset: int  # row of position 0 in the position table (RoBERTa: pad_token_id + 1)
    max_len: int     # longest input the position table allows
    hidden: int
    token_types: bool = False  # the model has more than one token type: a pair's types go into the batch


class AttnGroup(NamedTuple):
    """Examples e0:e1 of the batch (in packed order), attended together, padded to length L."""
    e0: int
    e1: int
    L: int
    mask: torch.Tensor | None  # [e1 - e0, 1, 1, L] bool, True = a real key; None when none of them is padded


class FastBatch(NamedTuple):
    """One batch.  Token-wise work runs on the N real tokens packed example after example ([N, H]); only attention
    uses a padded layout, [m, L] per group of examples.  Every index is built on the host in `collate` and moved
    with the batch (one copy), so forward never syncs."""
    input_ids: torch.Tensor  # [B, L] long, right-padded with the pad id, in the caller's order
    # The fields below are None / () when no example is padded: the packed rows are then input_ids' rows, N = B*L.
    tokens: torch.Tensor | None = None     # [N] long: the real tokens' ids, packed
    positions: torch.Tensor | None = None  # [N] long: their rows of the position table (pos_offset included)
    idx: torch.Tensor | None = None        # [N] long: each packed row's row in the groups' padded layouts, one after
                                           # the other (sum of m*L rows in all); None when no group has padding
    first: torch.Tensor | None = None      # [B] long: the packed row of each example's first token, packed order
    order: torch.Tensor | None = None      # [B] long: the packed position of each example of the caller's order;
                                           # None when packed order is the caller's order
    groups: tuple[AttnGroup, ...] = ()
    types: torch.Tensor | None = None      # [N] long (or [B*L] when nothing is padded): each token's type, in the
                                           # packed rows' order; None when every type is 0 (models.PairIds)

    @property
    def padded(self) -> bool:
        return self.tokens is not None


def attention_groups(lengths: Sequence[int], hidden: int, group_cost: float) -> list[int]:
    """Cut points 0 = c0 < c1 < ... < ck = len(lengths) of the groups of least total cost: sum over groups of
    m * L^2 * hidden (m examples padded to their longest, L) + group_cost.  lengths: sorted longest first.  Cuts
    only fall where the length changes (a dynamic programme over the runs of equal lengths)."""
    runs = [0] + [i for i in range(1, len(lengths)) if lengths[i] != lengths[i - 1]]
    if len(runs) == 1 or math.isinf(group_cost):
        return [0, len(lengths)]
    runs.append(len(lengths))
    best, back = [0.0] + [math.inf] * (len(runs) - 1), [0] * len(runs)
    for j in range(1, len(runs)):
        for i in range(j):
            c = best[i] + (runs[j] - runs[i]) * lengths[runs[i]] ** 2 * hidden + group_cost
            if c < best[j]:
                best[j], back[j] = c, i
    cuts, j = [], len(runs) - 1
    while j:
        cuts.append(runs[j])
        j = back[j]
    return [0] + cuts[::-1]


def collate(token_ids: Sequence[Sequence[int]], layout: PackLayout, device: torch.device,
            policy: ExecutionPolicy) -> FastBatch:
    """The padded ids plus, when any example is padded, the packed tokens and every index forward needs, all
    built here on the host from Python ints and moved to the device in one copy."""
    lengths = [len(t) for t in token_ids]
    B, L = len(lengths), max(lengths)
    if L > layout.max_len:
        raise LoraclsError(f"an input has {L} tokens but the model takes at most {layout.max_len}; "
                           f"lower data.max_length")
    nb = policy.non_blocking
    types = [token_types(t) for t in token_ids] \
        if layout.token_types and any(isinstance(t, PairIds) for t in token_ids) else None
    if min(lengths) == L:  # decided on the host from Python ints: no device sync.  Nothing to pack.
        ids = torch.tensor([i for t in token_ids for i in t], dtype=torch.long)
        if types is None:
            return FastBatch(ids.view(B, L).to(device, non_blocking=nb))
        dev = torch.cat([ids, torch.tensor([y for t in types for y in t])]).to(device, non_blocking=nb)
        return FastBatch(dev[:B * L].view(B, L), types=dev[B * L:])
    order = sorted(range(B), key=lambda i: -lengths[i])  # longest first (stable)
    cuts = attention_groups([lengths[i] for i in order], layout.hidden,
                             GROUP_COST if policy.attention_groups else math.inf)
    if len(cuts) == 2:  # one group: keep the caller's order
        order = list(range(B))
    lens = torch.tensor([lengths[i] for i in order])
    tokens = torch.tensor([i for b in order for i in token_ids[b]], dtype=torch.long)
    ids = torch.full((B, L), layout.pad_id, dtype=torch.long)
    ids[torch.arange(L) < torch.tensor(lengths)[:, None]] = torch.tensor([i for t in token_ids for i in t])
    idx, keys, groups, start = [], [], [], 0
    for e0, e1 in zip(cuts, cuts[1:]):
        Lg = int(lens[e0:e1].max())  # lens[e0] unless one group kept the caller's order
        keep = torch.arange(Lg) < lens[e0:e1, None]  # [m, Lg]
        idx.append(keep.view(-1).nonzero().view(-1) + start)
        start += (e1 - e0) * Lg
        padded = bool(lens[e0:e1].min() < Lg)
        if padded:
            keys.append(keep.view(-1))
        groups.append((e0, e1, Lg, padded))
    parts = {"ids": ids.view(-1), "tokens": tokens, "first": lens.cumsum(0) - lens,
             "positions": torch.cat([torch.arange(n) for n in lens.tolist()]) + layout.pos_offset}
    if types is not None:
        parts["types"] = torch.tensor([y for b in order for y in types[b]])
    if order != list(range(B)):
        parts["order"] = torch.tensor(order).argsort()
    if keys:
        parts["idx"], parts["keys"] = torch.cat(idx), torch.cat(keys).long()
    # Everything in one host tensor: one copy to the device, then views.
    dev = torch.cat(list(parts.values())).to(device, non_blocking=nb)
    dev = dict(zip(parts, dev.split([len(t) for t in parts.values()])))
    masks = iter(dev["keys"].bool().split([(e1 - e0) * Lg for e0, e1, Lg, p in groups if p]) if keys else ())
    groups = tuple(AttnGroup(e0, e1, Lg, next(masks).view(e1 - e0, 1, 1, Lg) if p else None)
                   for e0, e1, Lg, p in groups)
    return FastBatch(dev["ids"].view(B, L), dev["tokens"], dev["positions"], dev.get("idx"), dev["first"],
                     dev.get("order"), groups, dev.get("types"))


def eval_batches(lengths: Sequence[int], batch_size: int, policy: ExecutionPolicy) -> list[list[int]]:
    """Longest first: the memory peak comes at once, and each batch pads little.  (Only attention works on
    padding, so on the CPU, where it runs in groups of similar length, input order is as fast; on CUDA, where
    a batch is one group, sorting spares attention padding.)  On the CPU a batch also holds at most
    policy.eval_token_cap real tokens: the activations of bigger ones fall out of the cache and every memory-bound op
    (GELU, LayerNorm, residual adds) slows down.  Batching never changes the results."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cap = policy.eval_token_cap
    batches, current, tokens = [], [], 0
    for i in order:
        if current and (len(current) == batch_size or tokens + lengths[i] > cap):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return batches + [current] if current else batches
