"""The fast backend's own autograd pieces: pad/unpad of packed rows, cheap dropout, and CPU training attention.

Each exists because it measured faster than the plain PyTorch composition on its path (see the docstrings); the
tests check each against the plain ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from loracls.backends.fast.policy import ExecutionPolicy


class Pad(torch.autograd.Function):
    """[N, C] packed rows -> [R, C] padded rows (row idx[i] = x[i], zeros elsewhere).  idx holds no repeats, so
    the backward is a plain gather (autograd's own index_copy/index_select pair would index_add instead)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return x.new_zeros(rows, x.shape[1]).index_copy_(0, idx, x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (idx,) = ctx.saved_tensors
        return g.index_select(0, idx), None, None


class Unpad(torch.autograd.Function):
    """[R, C] padded rows -> [N, C] packed rows x[idx]; the inverse of Pad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, g.shape[1]).index_copy_(0, idx, g.contiguous()), None


def keep_bits(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, int, float]:
    """Cheap dropout randomness: int16 uniforms of `shape` (four per 64-bit draw), the threshold to keep at (>=)
    and the keep scale.  p is rounded to a multiple of 1/65536."""
    n = math.prod(shape)
    threshold = min(round(p * 65536), 65535) - 32768
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1).view(torch.int16)[:n]
    return bits.view(shape), threshold, 65536.0 / (32768 - threshold)


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout keep mask shaped and typed like x (0./1., written straight by the comparison: no bool->float
    copy) and its keep scale."""
    bits, threshold, scale = keep_bits(x.shape, p)
    keep = torch.empty(x.shape, dtype=x.dtype)
    torch.ge(bits, threshold, out=keep)
    return keep, scale


def dropout(x: torch.Tensor, p: float, training: bool, policy: ExecutionPolicy) -> torch.Tensor:
    """Inverted dropout."""
    if not training or p <= 0.0:
        return x
    if not policy.cheap_dropout:
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x, p)
    return x * keep.mul_(scale)


def lora_dropout(x: torch.Tensor, p: float, policy: ExecutionPolicy) -> tuple[torch.Tensor, float]:
    """Training dropout of a LoRA branch's input, with its 1/(1-p) scale returned apart under the cheap policy,
    so that it goes on the small end of the branch (the B GEMM's alpha) rather than over x."""
    if not policy.cheap_dropout:
        return F.dropout(x, p, True), 1.0
    keep, scale = keep_mask(x, p)
    return x * keep, scale


class TrainAttention(torch.autograd.Function):
    """drop(softmax(q k^T / sqrt(d), padded keys masked)) v for CPU training, with as few [B, n, Lq, L] tensors
    as the maths allows: the scores become the probabilities in place, the dropout mask is a bool tensor, the
    dropout scale and 1/sqrt(d) are applied to the small [.., d] operands, and the backward works in place on
    one buffer.  (Autograd through the plain ops allocates about three times as many of those big tensors, and
    on the CPU fresh large allocations cost page faults as well as bandwidth.)"""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: torch.Tensor | None,
                p: float) -> torch.Tensor:
        """drop: [B, 1, 1, L] bool, True = a padded key (masked out), or None."""
        c = q.shape[-1] ** -0.5
        s = torch.matmul(q * c, k.transpose(-1, -2))
        if drop is not None:
            s.masked_fill_(drop, float("-inf"))  # every row keeps >= 1 real key, so no row is all -inf
        torch.softmax(s, -1, out=s)  # the CPU kernel works row by row: safe in place
        bits, threshold, scale = keep_bits(s.shape, p)
        dropped = bits < threshold
        pd = torch.where(dropped, 0.0, s)  # dropped probabilities, unscaled: the scale goes on the [.., d] side
        ctx.save_for_backward(q, k, v, s, dropped, pd)
        ctx.c, ctx.scale = c, scale
        return torch.matmul(pd, v).mul_(scale)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, prob, dropped, pd = ctx.saved_tensors
        g = g * ctx.scale
        gv = torch.matmul(pd.transpose(-1, -2), g)
        gs = torch.matmul(g, v.transpose(-1, -2))  # d loss / d pd
        # through the dropout, then the softmax: prob * (gs - sum(prob * gs)), in place
        gs.masked_fill_(dropped, 0.0).mul_(prob)
        gs.addcmul_(prob, gs.sum(-1, keepdim=True), value=-1.0)
        gq = torch.matmul(gs, k).mul_(ctx.c)
        gk = torch.matmul(gs.transpose(-1, -2), q).mul_(ctx.c)
        return gq, gk, gv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float,
              training: bool, policy: ExecutionPolicy) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout p on the probabilities in training (mask: [B, 1, 1, L]
    bool, True = a real key)."""
    if not training or p <= 0.0 or not policy.hand_attention:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    return TrainAttention.apply(q, k, v, None if mask is None else ~mask, p)
