"""The `fast` backend: a BERT-family encoder written directly in PyTorch, with LoRA fused into it.

It computes the same function as `AutoModelForSequenceClassification` + PEFT LoRA (to float32 rounding), so
adapters move freely between the two backends, but does less work per step.

The maths, per encoder layer with hidden size H, n heads of size d = H / n, input X [N real tokens, H]:

    [Q K V] = X Wqkv^T + bqkv  +  s * [uQ uK uV] blockdiag(BQ, BK, BV)^T    (Wqkv = [Wq; Wk; Wv], one GEMM)
    uT = drop_T(X) AT^T                  (targeted T only; each T its own dropout mask, as PEFT)
    C  = softmax(Q K^T / sqrt(d) + padding mask) V                       (per head and example)
    X1 = LayerNorm(X + drop(C Wo^T + bo + s * Bo Ao drop(C)))
    X2 = LayerNorm(X1 + drop(W2 gelu(W1 X1 + b1 + s*B1 A1 drop(X1)) + b2 + s*B2 A2 drop(...)))

with s = alpha / r (or alpha / sqrt(r) for rsLoRA) and LoRA A, B only where targeted.  Embeddings are
LayerNorm(word[id] + position[p] + token_type[0]) with p = t for BERT and p = padding_idx + 1 + t for RoBERTa.
Heads, on the first token h0 of the last layer:

    BERT     logits = W_c drop(tanh(W_pool h0 + b_pool)) + b_c
    RoBERTa  logits = W_out drop(tanh(W_dense drop(h0) + b_dense)) + b_out

The head variants (config.HEAD_CHOICES; peft_format's docstring has their PEFT file format):
    native       BERT: pooler frozen, W_c trained.  RoBERTa: W_dense and W_out trained.
    linear       BERT: the same as native.  RoBERTa: W_dense frozen at the identity (b_dense = 0), W_out trained.
    native-lora  as linear, plus LoRA (the encoder's r, alpha, dropout, rslora) on the frozen W_pool (BERT) or on
                 the frozen identity W_dense (RoBERTa): W h + b + s * B A drop(h), h the layer's input.

Where the work goes away compared with transformers + PEFT:
- Unpadding: every token-wise op (embeddings, their LayerNorm, all linear layers with their LoRA, LayerNorms, GELU,
  dropout) runs on the N real tokens of the batch packed into [N, H] rows; only attention sees a padded layout.
  Per layer the packed Q/K/V rows are scattered (one index_copy) into zero-padded [m, L] blocks, attention runs
  with the padding mask, and the context rows are gathered back.  A batch without padding skips both.  The
  indices are built on the host in `collate`, so forward never syncs with the device.
- On the CPU, attention itself does little padding either: collate sorts a padded batch's examples by length
  and attends in contiguous groups, each padded to its own longest (grouping chosen by a cost model,
  `_attention_groups`); logits come back in the caller's order.  On CUDA a batch is one group (launch overhead
  outweighs the padded attention work there).  Training batches are the base class's random permutation, as the
  peft backend's: the same seed gives the same batches.
- Only h0 feeds the head, so the last layer computes keys/values for all tokens but the query, attention output,
  FFN and LayerNorms for the first token only (exact, not an approximation).
- Q, K, V are one GEMM on a contiguous fused weight; the targeted B matrices one GEMM (block-diagonal).  The
  targeted A matrices are one GEMM without dropout; with LoRA dropout in training each draws its own mask (one
  small GEMM each) as PEFT does, which costs about 3% of a CPU training step over one shared mask.
- CPU training: dropout masks come four per 64-bit random draw (the per-element bernoulli_ of F.dropout costs
  more than the GEMMs it sits between), LoRA dropout's 1/(1-p) goes on the B GEMM's alpha, and attention with
  dropout is a hand-written autograd function (SDPA's fused CPU kernel has no dropout; autograd through the
  plain ops makes about three times as many [.., L, L] temporaries).
- `merge()` folds LoRA into the weights for inference.  Inference batches are sorted by length (on CUDA that
  spares attention padding; on the CPU it makes no measurable difference with the groups).
On CUDA the frozen weights are stored and run in bf16; LoRA and the head keep fp32 master weights (cast on use),
and logits are float32.  On the CPU everything is fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loracls.backends.base import Backend, Classifier
from loracls.config import TARGET_CHOICES, LoraSettings
from loracls.errors import LoraclsError, first_line
from loracls.peft_format import TARGET_MODULE_PATHS, head_lora_module, identity_head_keys
from loracls.plan import ROBERTA_TYPES, SUPPORTED_MODEL_TYPES

_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# Short attribute-safe names for the targets (ParameterDict keys cannot contain dots).
_KEY = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "ao", "intermediate.dense": "fi",
        "output.dense": "fo"}


# CPU: the examples of a padded batch are sorted by length and attention runs on contiguous groups of them, each
# padded to its own longest.  A group costs about m * L^2 * H (m examples of padded length L) plus a fixed
# _GROUP_COST (the extra ops of one more group, forward and backward), in the same units; collate picks the grouping
# of least total cost.  (Measured with MiniLM on one CPU thread; the split barely moves around the optimum.)
_GROUP_COST = 1_000_000

# CPU inference: the most real tokens in one batch (see FastClassifier.eval_batches).  With MiniLM on 2 cores,
# 1,000 to 2,000 tokens ran fastest, about 1.25x faster than 13,500 (256 AG News texts of mean length 53).
_CPU_EVAL_TOKENS = 1536


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

    @property
    def padded(self) -> bool:
        return self.tokens is not None


class _Pad(torch.autograd.Function):
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


class _Unpad(torch.autograd.Function):
    """[R, C] padded rows -> [N, C] packed rows x[idx]; the inverse of _Pad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, g.shape[1]).index_copy_(0, idx, g.contiguous()), None


def _keep_bits(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, int, float]:
    """CPU dropout randomness: int16 uniforms of `shape` (four per 64-bit draw: the per-element bernoulli_ of
    F.dropout costs more than the GEMMs it sits between), the threshold to keep at (>=) and the keep scale.
    p is rounded to a multiple of 1/65536."""
    n = math.prod(shape)
    threshold = min(round(p * 65536), 65535) - 32768
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1).view(torch.int16)[:n]
    return bits.view(shape), threshold, 65536.0 / (32768 - threshold)


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A CPU dropout keep mask shaped and typed like x (0./1., written straight by the comparison: no bool->float
    copy) and its keep scale."""
    bits, threshold, scale = _keep_bits(x.shape, p)
    keep = torch.empty(x.shape, dtype=x.dtype)
    torch.ge(bits, threshold, out=keep)
    return keep, scale


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (on the CPU with _keep_bits' cheap randomness)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep, scale = _keep_mask(x, p)
    return x * keep.mul_(scale)


def _lora_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Training dropout of a LoRA branch's input, with its 1/(1-p) scale returned apart (on the CPU) so that it
    goes on the small end of the branch (the B GEMM's alpha) rather than over x."""
    if x.device.type != "cpu":
        return F.dropout(x, p, True), 1.0
    keep, scale = _keep_mask(x, p)
    return x * keep, scale


class _CpuTrainAttention(torch.autograd.Function):
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
        bits, threshold, scale = _keep_bits(s.shape, p)
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


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float,
               training: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout p on the probabilities in training (mask: [B, 1, 1, L]
    bool, True = a real key).  SDPA's fused CPU kernel has no dropout (it falls back to a slower generic path),
    so CPU training with attention dropout uses _CpuTrainAttention."""
    if not training or p <= 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    return _CpuTrainAttention.apply(q, k, v, None if mask is None else ~mask, p)


def _attention_groups(lengths: Sequence[int], hidden: int, group_cost: float) -> list[int]:
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


def _storage_dtype(device: torch.device) -> torch.dtype:
    """Frozen weights and activations: bf16 on CUDA (tensor cores, half the memory traffic), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# -- loading a checkpoint ---------------------------------------------------------------------------------------

def _load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `model_dir` (safetensors preferred, sharded or not)."""
    from safetensors.torch import load_file

    def read(name: str) -> dict[str, torch.Tensor]:
        try:
            if name.endswith(".safetensors"):
                return load_file(str(model_dir / name))
            return torch.load(model_dir / name, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated or pickled with code: one line, no traceback
            raise LoraclsError(f"cannot read {model_dir / name} ({first_line(e)}); re-download the model") from None

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (model_dir / single).is_file():
            return read(single)
        if (model_dir / index).is_file():
            shards = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in read(s).items()}
    raise LoraclsError(f"{model_dir} has no model.safetensors or pytorch_model.bin; point --model at a full "
                       "model folder")


def _strip_prefix(state: dict[str, torch.Tensor], model_dir: Path) -> dict[str, torch.Tensor]:
    """Drop the `bert.` / `roberta.` / any prefix (and heads of other tasks), and rename old LayerNorm
    gamma/beta to weight/bias."""
    anchor = "embeddings.word_embeddings.weight"
    found = [k for k in state if k.endswith(anchor)]
    if not found:
        raise LoraclsError(f"the checkpoint in {model_dir} has no {anchor}; is it a BERT-family encoder?")
    prefix = min(found, key=len)[: -len(anchor)]
    out = {}
    for k, v in state.items():
        if k.startswith(prefix) or k.startswith("classifier."):  # a saved seq-cls head sits outside the prefix
            k = k[len(prefix):] if k.startswith(prefix) else k
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            out[k] = v
    return out


# -- the model --------------------------------------------------------------------------------------------------

class _Layer(nn.Module):
    """One post-LayerNorm encoder layer: frozen fused weights as buffers, LoRA A/B as parameters."""

    def __init__(self, cfg: Any, w: dict[str, torch.Tensor], targets: list[str], rank: int, dtype: torch.dtype):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.H, self.n_heads, self.eps = H, cfg.num_attention_heads, cfg.layer_norm_eps
        self.p_hidden, self.p_attn = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob
        self.gelu = _GELU[cfg.hidden_act]
        frozen = {
            "qkv_w": torch.cat([w["attention.self.query.weight"], w["attention.self.key.weight"],
                                w["attention.self.value.weight"]]),
            "qkv_b": torch.cat([w["attention.self.query.bias"], w["attention.self.key.bias"],
                                w["attention.self.value.bias"]]),
            "ao_w": w["attention.output.dense.weight"], "ao_b": w["attention.output.dense.bias"],
            "ln1_w": w["attention.output.LayerNorm.weight"], "ln1_b": w["attention.output.LayerNorm.bias"],
            "fi_w": w["intermediate.dense.weight"], "fi_b": w["intermediate.dense.bias"],
            "fo_w": w["output.dense.weight"], "fo_b": w["output.dense.bias"],
            "ln2_w": w["output.LayerNorm.weight"], "ln2_b": w["output.LayerNorm.bias"],
        }
        for name, t in frozen.items():
            self.register_buffer(name, t.to(dtype).contiguous(), persistent=False)
        dims = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (H, I), "fo": (I, H)}  # (in, out)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for t in targets:
            k = _KEY[t]
            self.A[k] = nn.Parameter(torch.empty(rank, dims[k][0]))
            self.B[k] = nn.Parameter(torch.zeros(dims[k][1], rank))
        self.qkv_lora = [(i, k) for i, k in enumerate("qkv") if k in self.A]  # (block in Wqkv, key)

    def _linear(self, x: torch.Tensor, name: str, key: str, scale: float, p: float) -> torch.Tensor:
        """x W^T + b, plus s * B A drop(x) when `key` is adapted."""
        y = F.linear(x, getattr(self, name + "_w"), getattr(self, name + "_b"))
        if key in self.A:
            xd, s = _lora_dropout(x, p) if self.training and p > 0.0 else (x, 1.0)
            u = F.linear(xd, self.A[key].to(x.dtype))
            y.addmm_(u, self.B[key].to(x.dtype).t(), alpha=scale * s)  # in place: linear's backward never reads y
        return y

    def _qkv(self, x: torch.Tensor, blocks: range, scale: float, p: float) -> torch.Tensor:
        """x [M, H] -> the Q/K/V `blocks` (a range in 0..2) [M, len(blocks)*H], LoRA included where targeted.
        One GEMM for the frozen blocks and one (block-diagonal) for the targeted B matrices, added in place.  The
        A matrices: one GEMM when no dropout applies; in training with LoRA dropout, one per target, each on its
        own dropout of x, as PEFT does."""
        H = self.H
        y = F.linear(x, self.qkv_w[blocks.start * H:blocks.stop * H], self.qkv_b[blocks.start * H:blocks.stop * H])
        lora = [(i, k) for i, k in self.qkv_lora if i in blocks]
        if not lora:
            return y
        t, dt = len(lora), x.dtype
        if self.training and p > 0.0:  # an independent mask per target
            u, s = [], 1.0
            for _, k in lora:
                xd, s = _lora_dropout(x, p)
                u.append(F.linear(xd, self.A[k].to(dt)))
            u = u[0] if t == 1 else torch.cat(u, 1)  # [M, t*r], target-major columns
        else:
            u, s = F.linear(x, torch.cat([self.A[k] for _, k in lora]).to(dt)), 1.0
        r = u.shape[1] // t
        where = {i: j for j, (i, _) in enumerate(lora)}
        Bm = torch.cat([F.pad(self.B[lora[where[i]][1]], (where[i] * r, (t - 1 - where[i]) * r)) if i in where
                        else self.B[lora[0][1]].new_zeros(H, t * r) for i in blocks])  # [len(blocks)*H, t*r]
        return y.addmm_(u, Bm.to(dt).t(), alpha=scale * s)  # in place: linear's backward never reads y

    def forward(self, x: torch.Tensor, batch: FastBatch, scale: float, p_lora: float,
                first_only: bool) -> torch.Tensor:
        """x: [N, H] packed real tokens -> [N, H], or [B, H] (first token of each example, packed order) when
        `first_only`.  Only attention sees a padded layout: the packed Q/K/V rows are scattered into the groups'
        padded [m, L] layouts (one index_copy for all groups), and the context gathered back."""
        H, n, training = self.H, self.n_heads, self.training
        d, idx = H // n, batch.idx
        if batch.padded:
            groups, P = batch.groups, sum((g.e1 - g.e0) * g.L for g in batch.groups)
        else:  # one group, nothing padded
            B, L = batch.input_ids.shape
            groups, P = (AttnGroup(0, B, L, None),), B * L
        sizes = [(g.e1 - g.e0) * g.L for g in groups]
        c = 2 if first_only else 3
        if first_only:  # queries for token 0 only; keys and values for every token
            x0 = x.view(-1, groups[0].L, H)[:, 0] if batch.first is None else x.index_select(0, batch.first)
            q = self._qkv(x0, range(0, 1), scale, p_lora)
            qs = q.split([g.e1 - g.e0 for g in groups]) if len(groups) > 1 else [q]
            y = self._qkv(x, range(1, 3), scale, p_lora)
        else:
            y = self._qkv(x, range(0, 3), scale, p_lora)
        y = y if idx is None else _Pad.apply(y, idx, P)  # [P, c*H]
        ctx = []
        for g, yg in zip(groups, y.split(sizes) if len(groups) > 1 else [y]):
            m = g.e1 - g.e0
            yg = yg.view(m, g.L, c, n, d)
            k, v = yg[:, :, c - 2].transpose(1, 2), yg[:, :, c - 1].transpose(1, 2)  # [m, n, L, d] views
            if first_only:
                qg = qs[len(ctx)].view(m, 1, n, d).transpose(1, 2)
                ctx.append(_attention(qg, k, v, g.mask, self.p_attn, training).reshape(m, H))
            else:
                qg = yg[:, :, 0].transpose(1, 2)
                ctx.append(_attention(qg, k, v, g.mask, self.p_attn, training).transpose(1, 2).reshape(m * g.L, H))
        ctx = ctx[0] if len(ctx) == 1 else torch.cat(ctx)
        if not first_only and idx is not None:
            ctx = _Unpad.apply(ctx, idx)
        res = x0 if first_only else x
        h = self._linear(ctx, "ao", "ao", scale, p_lora)
        x1 = F.layer_norm(res + _dropout(h, self.p_hidden, training), (H,), self.ln1_w, self.ln1_b, self.eps)
        h = F.gelu(self._linear(x1, "fi", "fi", scale, p_lora), approximate=self.gelu)
        h = self._linear(h, "fo", "fo", scale, p_lora)
        return F.layer_norm(x1 + _dropout(h, self.p_hidden, training), (H,), self.ln2_w, self.ln2_b, self.eps)


class FastClassifier(Classifier):
    """A BERT/RoBERTa encoder with LoRA and a classification head.  Build it with FastBackend.build."""

    def __init__(self, cfg: Any, state: dict[str, torch.Tensor], num_labels: int, lora: LoraSettings,
                 device: torch.device, seed: int):
        super().__init__()
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        self.config, self.lora, self.num_labels = cfg, lora, num_labels
        self.model_type: str = cfg.model_type  # for peft_format.adapter_config(..., model_type=model.model_type)
        self.is_roberta = cfg.model_type in ROBERTA_TYPES
        self.prefix = "roberta" if self.is_roberta else "bert"
        self.scale = lora.scaling
        self.merged = False
        dtype = _storage_dtype(device)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        # RoBERTa numbers real tokens from padding_idx + 1; with right padding that is a fixed slice of the table.
        self.pos_offset = self.pad_id + 1 if self.is_roberta else 0
        self.max_len = cfg.max_position_embeddings - self.pos_offset
        self.p_hidden = cfg.hidden_dropout_prob
        cd = getattr(cfg, "classifier_dropout", None)
        self.p_head = cd if cd is not None else cfg.hidden_dropout_prob

        required = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                    "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                    "embeddings.LayerNorm.bias"]
        required += [f"encoder.layer.{i}.{m}.{p}" for i in range(L) for m in (
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
            for p in ("weight", "bias")]
        missing = [k for k in required if k not in state]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise LoraclsError(f"the checkpoint lacks {missing[0]}{more}; it does not match its config.json "
                               f"({cfg.model_type}, {L} layers)")

        g = torch.Generator().manual_seed(seed)
        emb = {k: state[f"embeddings.{k}"].float() for k in (
            "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight")}
        self.register_buffer("word_emb", emb["word_embeddings.weight"].to(dtype), persistent=False)
        # token_type_ids are always 0, so token_type[0] is folded into every position row.
        pos = emb["position_embeddings.weight"] + emb["token_type_embeddings.weight"][0]
        self.register_buffer("pos_emb", pos.to(dtype), persistent=False)
        self.register_buffer("emb_ln_w", state["embeddings.LayerNorm.weight"].to(dtype), persistent=False)
        self.register_buffer("emb_ln_b", state["embeddings.LayerNorm.bias"].to(dtype), persistent=False)

        # The head (and BERT's pooler), fp32.  As transformers: taken from the checkpoint when it has them with
        # the right shapes, else normal(0, initializer_range) weights and zero biases (drawn either way, so the
        # seed gives the same LoRA init whatever the checkpoint holds).
        def linear(name: str, n_in: int, n_out: int) -> tuple[nn.Parameter, nn.Parameter]:
            w, b = torch.empty(n_out, n_in), torch.zeros(n_out)
            nn.init.normal_(w, 0.0, cfg.initializer_range, generator=g)
            cw, cb = state.get(f"{name}.weight"), state.get(f"{name}.bias")
            if cw is not None and cb is not None and cw.shape == w.shape and cb.shape == b.shape:
                w, b = cw.float().clone(), cb.float().clone()
            return nn.Parameter(w), nn.Parameter(b)

        # Frozen head weights are fp32 buffers (BERT's pooler as in PEFT; RoBERTa's identity dense of the linear
        # and native-lora heads): tiny, and they run on one token per example.
        self.head_variant = lora.head
        if self.is_roberta:
            dw, db = linear("classifier.dense", H, H)  # drawn even when replaced: same LoRA init for every head
            if self.head_variant == "native":
                self.dense_w, self.dense_b = dw, db
            else:
                self.register_buffer("dense_w", torch.eye(H), persistent=False)
                self.register_buffer("dense_b", torch.zeros(H), persistent=False)
            self.out_w, self.out_b = linear("classifier.out_proj", H, num_labels)
        else:
            pw, pb = linear("pooler.dense", H, H)
            self.register_buffer("pool_w", pw.detach(), persistent=False)
            self.register_buffer("pool_b", pb.detach(), persistent=False)
            self.out_w, self.out_b = linear("classifier", H, num_labels)
        # native-lora: LoRA on the frozen pooler dense (BERT) or identity classifier.dense (RoBERTa), fp32.
        self.head_A = self.head_B = None
        if self.head_variant == "native-lora":
            self.head_A = nn.Parameter(torch.empty(lora.rank, H))
            self.head_B = nn.Parameter(torch.zeros(H, lora.rank))

        adapted = set(range(L)) if lora.layers is None else set(lora.layers)
        self.layers = nn.ModuleList([
            _Layer(cfg, {k[len(f"encoder.layer.{i}."):]: v.float() for k, v in state.items()
                         if k.startswith(f"encoder.layer.{i}.")},
                   lora.targets if i in adapted else [], lora.rank, dtype) for i in range(L)])

        # PEFT's key names, in PEFT's order (layer, then module order, A before B, head last).  A is
        # kaiming-uniform(a=sqrt(5)) as PEFT, drawn in this same order from the seeded generator.
        self._named: list[tuple[str, nn.Parameter]] = []
        for i, layer in enumerate(self.layers):
            for t in TARGET_CHOICES:
                if _KEY[t] in layer.A:
                    A, B = layer.A[_KEY[t]], layer.B[_KEY[t]]
                    nn.init.kaiming_uniform_(A.data, a=math.sqrt(5), generator=g)
                    base = f"base_model.model.{self.prefix}.encoder.layer.{i}.{TARGET_MODULE_PATHS[t]}"
                    self._named += [(f"{base}.lora_A.weight", A), (f"{base}.lora_B.weight", B)]
        if self.head_A is not None:  # after the encoder, before the trained head: PEFT's module order
            nn.init.kaiming_uniform_(self.head_A.data, a=math.sqrt(5), generator=g)
            base = "base_model.model." + head_lora_module(lora, cfg.model_type)
            self._named += [(f"{base}.lora_A.weight", self.head_A), (f"{base}.lora_B.weight", self.head_B)]
        if not self.is_roberta:
            head = [("classifier", self.out_w, self.out_b)]
        elif self.head_variant == "native":
            head = [("classifier.dense", self.dense_w, self.dense_b), ("classifier.out_proj", self.out_w, self.out_b)]
        else:
            head = [("classifier.out_proj", self.out_w, self.out_b)]
        for m, w, b in head:
            self._named += [(f"base_model.model.{m}.weight", w), (f"base_model.model.{m}.bias", b)]
        # The frozen identity dense of the RoBERTa linear / native-lora heads is saved with the adapter (not trained)
        # so that PEFT and `loracls export` rebuild it; see peft_format.identity_head_keys.
        self._identity_keys = identity_head_keys(lora, cfg.model_type)

        # PEFT's "all params": the plain seq-cls model (BERT: with pooler; RoBERTa: without) + LoRA + the trained head
        # again (modules_to_save keeps a copy beside the original; for RoBERTa linear that copy holds the frozen
        # dense too, since modules_to_save=["classifier"]).
        base = sum(b.numel() for b in self.buffers()) + emb["token_type_embeddings.weight"].numel()
        base += sum(w.numel() + b.numel() for _, w, b in head)
        if self.is_roberta and self.head_variant == "linear":
            base += self.dense_w.numel() + self.dense_b.numel()
        self._total = base + sum(p.numel() for _, p in self._named)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.word_emb.device

    # -- batching ---------------------------------------------------------------------------------------------
    def collate(self, token_ids: Sequence[Sequence[int]]) -> FastBatch:
        """The padded ids plus, when any example is padded, the packed tokens and every index forward needs, all
        built here on the host from Python ints and moved to the device in one copy."""
        lengths = [len(t) for t in token_ids]
        B, L = len(lengths), max(lengths)
        if L > self.max_len:
            raise LoraclsError(f"an input has {L} tokens but the model takes at most {self.max_len}; "
                               f"lower data.max_length")
        nb = self.device.type == "cuda"
        if min(lengths) == L:  # decided on the host from Python ints: no device sync.  Nothing to pack.
            ids = torch.tensor([i for t in token_ids for i in t], dtype=torch.long).view(B, L)
            return FastBatch(ids.to(self.device, non_blocking=nb))
        order = sorted(range(B), key=lambda i: -lengths[i])  # longest first (stable)
        cuts = _attention_groups([lengths[i] for i in order], self.config.hidden_size,
                                 _GROUP_COST if self.device.type == "cpu" else math.inf)
        if len(cuts) == 2:  # one group: keep the caller's order
            order = list(range(B))
        lens = torch.tensor([lengths[i] for i in order])
        tokens = torch.tensor([i for b in order for i in token_ids[b]], dtype=torch.long)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
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
                 "positions": torch.cat([torch.arange(n) for n in lens.tolist()]) + self.pos_offset}
        if order != list(range(B)):
            parts["order"] = torch.tensor(order).argsort()
        if keys:
            parts["idx"], parts["keys"] = torch.cat(idx), torch.cat(keys).long()
        # Everything in one host tensor: one copy to the device, then views.
        dev = torch.cat(list(parts.values())).to(self.device, non_blocking=nb)
        dev = dict(zip(parts, dev.split([len(t) for t in parts.values()])))
        masks = iter(dev["keys"].bool().split([(e1 - e0) * Lg for e0, e1, Lg, p in groups if p]) if keys else ())
        groups = tuple(AttnGroup(e0, e1, Lg, next(masks).view(e1 - e0, 1, 1, Lg) if p else None)
                       for e0, e1, Lg, p in groups)
        return FastBatch(dev["ids"].view(B, L), dev["tokens"], dev["positions"], dev.get("idx"), dev["first"],
                         dev.get("order"), groups)

    def eval_batches(self, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
        """Longest first: the memory peak comes at once, and each batch pads little.  (Only attention works on
        padding, so on the CPU, where it runs in groups of similar length, input order is as fast; on CUDA, where
        a batch is one group, sorting spares attention padding.)  On the CPU a batch also holds at most
        _CPU_EVAL_TOKENS real tokens: the activations of bigger ones fall out of the cache and every memory-bound op
        (GELU, LayerNorm, residual adds) slows down.  Batching never changes the results."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        cap = _CPU_EVAL_TOKENS if self.device.type == "cpu" else math.inf
        batches, current, tokens = [], [], 0
        for i in order:
            if current and (len(current) == batch_size or tokens + lengths[i] > cap):
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += lengths[i]
        return batches + [current] if current else batches

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, batch: FastBatch) -> torch.Tensor:
        H, training = self.config.hidden_size, self.training
        if batch.padded:
            x = F.embedding(batch.tokens, self.word_emb) + F.embedding(batch.positions, self.pos_emb)
        else:  # nothing padded: the packed rows are the padded ones
            B, L = batch.input_ids.shape
            x = F.embedding(batch.input_ids, self.word_emb) + self.pos_emb[self.pos_offset:self.pos_offset + L]
            x = x.view(B * L, H)
        x = F.layer_norm(x, (H,), self.emb_ln_w, self.emb_ln_b, self.config.layer_norm_eps)
        x = _dropout(x, self.p_hidden, training)
        p_lora = 0.0 if self.merged else self.lora.dropout
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, self.scale, p_lora, first_only=i == len(self.layers) - 1)
        if batch.order is not None:  # packed order -> the caller's order
            x = x.index_select(0, batch.order)
        h0 = x.float()  # [B, H]: the first token; the head runs in fp32
        if self.is_roberta:
            h0 = _dropout(h0, self.p_head, training)
            h = F.linear(h0, self.dense_w, self.dense_b)
        else:
            h = F.linear(h0, self.pool_w, self.pool_b)
        if self.head_A is not None:  # native-lora: s * B A drop(h0) on the pooler / classifier.dense
            h = h + self.scale * F.linear(F.linear(_dropout(h0, p_lora, training), self.head_A), self.head_B)
        return F.linear(_dropout(torch.tanh(h), self.p_head, training), self.out_w, self.out_b)

    # -- parameters, adapter format, merge --------------------------------------------------------------------
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(list(self._named))

    def _saved(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of the adapter file: the trainable ones, plus the frozen identity dense of the RoBERTa linear
        and native-lora heads (placed where PEFT's state dict has it: before classifier.out_proj)."""
        if self._identity_keys is None:
            return list(self._named)
        frozen = list(zip(self._identity_keys, (self.dense_w, self.dense_b)))
        i = next(i for i, (k, _) in enumerate(self._named) if k.startswith("base_model.model.classifier."))
        return self._named[:i] + frozen + self._named[i:]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under PEFT's saved key names (plus, for the RoBERTa linear / native-lora heads, the
        frozen identity classifier.dense), float32 on the CPU."""
        if self.merged:
            raise RuntimeError("adapter_state_dict() after merge(): the LoRA branch is gone")
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self._saved()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.merged:
            raise RuntimeError("load_adapter_state_dict() after merge(): the LoRA branch is gone")
        expected = dict(self._saved())
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has unexpected {extra[0]}"
            n = len(missing) + len(extra) - 1
            raise LoraclsError(f"the adapter {what}{f' (and {n} more mismatches)' if n else ''}; it was trained "
                               "with other targets, layers, head or model")
        for k, p in expected.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise LoraclsError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, expected "
                                   f"{tuple(p.shape)}; it was trained with another rank, model or label count")
        with torch.no_grad():
            for k, p in expected.items():
                p.copy_(state[k].to(p.device, p.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W += s * B @ A (computed in fp32) for every adapted linear; the LoRA parameters are then dropped."""
        if self.merged:
            raise RuntimeError("merge() was already called on this model")
        for layer in self.layers:
            H = layer.H
            rows = {"q": ("qkv_w", slice(0, H)), "k": ("qkv_w", slice(H, 2 * H)),
                    "v": ("qkv_w", slice(2 * H, 3 * H)), "ao": ("ao_w", slice(None)),
                    "fi": ("fi_w", slice(None)), "fo": ("fo_w", slice(None))}
            for k in list(layer.A.keys()):
                name, sl = rows[k]
                w = getattr(layer, name)[sl]
                w.copy_((w.float() + self.scale * (layer.B[k].float() @ layer.A[k].float())).to(w.dtype))
            layer.A, layer.B, layer.qkv_lora = nn.ParameterDict(), nn.ParameterDict(), []
        if self.head_A is not None:
            w = self.dense_w if self.is_roberta else self.pool_w
            w.add_(self.scale * (self.head_B @ self.head_A))
            self.head_A = self.head_B = None
        self._named = [(k, p) for k, p in self._named if "lora_" not in k]
        self.merged = True

    def total_parameters(self) -> int:
        return self._total


class FastBackend(Backend):
    name = "fast"

    def unsupported_reason(self, model_config: Any, lora: LoraSettings) -> str | None:
        mt = getattr(model_config, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            return f"model type {mt!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        pe = getattr(model_config, "position_embedding_type", None) or "absolute"
        if pe != "absolute":
            return f"position_embedding_type {pe!r} (only absolute positions are implemented)"
        act = getattr(model_config, "hidden_act", None)
        if act not in _GELU:
            return f"activation {act!r} (only gelu is implemented)"
        if getattr(model_config, "is_decoder", False) or getattr(model_config, "add_cross_attention", False):
            return "decoder / cross-attention configs are not plain encoders"
        return None

    def build(self, model_dir: str, num_labels: int, lora: LoraSettings, device: torch.device, *,
              seed: int, trust_remote_code: bool = False) -> FastClassifier:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise LoraclsError(f"cannot read the model config in {model_dir} ({first_line(e, 100)})") from None
        reason = self.unsupported_reason(cfg, lora)
        if reason:
            raise LoraclsError(f"the fast backend cannot run {model_dir}: {reason}; use --backend peft")
        if lora.layers is not None and max(lora.layers) >= cfg.num_hidden_layers:
            raise LoraclsError(f"lora.layers has index {max(lora.layers)} but the model has "
                               f"{cfg.num_hidden_layers} layers (0..{cfg.num_hidden_layers - 1})")
        folder = Path(model_dir)
        state = _strip_prefix(_load_state(folder), folder)
        return FastClassifier(cfg, state, num_labels, lora, torch.device(device), seed)


__all__ = ["FastBackend", "FastClassifier", "FastBatch"]
