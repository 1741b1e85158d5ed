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
LayerNorm(word[id] + position[p] + token_type[y]) with p = t for BERT and p = padding_idx + 1 + t for RoBERTa, and
y = 1 on a text pair's second text where the model has more than one token type (models.PairIds), else 0.
token_type[0] is folded into the position rows; a batch holding a pair adds token_type[1] - token_type[0] to the
rows of type 1.
Heads, on the first token h0 of the last layer:

    BERT     logits = W_c drop(tanh(W_pool h0 + b_pool)) + b_c
    RoBERTa  logits = W_out drop(tanh(W_dense drop(h0) + b_dense)) + b_out

The head variants (config.HEAD_CHOICES; placement's docstring has their PEFT file format, loracls.families the
head layouts):
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
  `packing.attention_groups`); logits come back in the caller's order.  On CUDA a batch is one group (launch overhead
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
and logits are float32.  On the CPU everything is fp32.  Every such choice is a field of the execution policy
(policy.py), picked from the device once; the tests run the CUDA policy on the CPU.

Method full (FastFullClassifier) runs the same encoder with every weight an fp32 parameter under transformers' name,
cast to the policy's dtype where it is used (q, k and v stacked there), and no LoRA: it keeps the unpadding,
attention groups and kernels, which is what makes it faster than transformers' own model (docs/benchmarks.md).

The package: policy.py (CPU/CUDA choices), kernels.py (autograd pieces), packing.py (batches), weights.py
(checkpoint reading), model.py (the encoder and the Backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loracls import families, placement
from loracls.backends.base import Backend, Classifier, copy_into, cpu_copies, pretrained_classifier
from loracls.backends.fast.kernels import Pad, Unpad, attention, dropout, lora_dropout
from loracls.backends.fast.packing import AttnGroup, FastBatch, PackLayout, collate, eval_batches
from loracls.backends.fast.policy import ExecutionPolicy, policy_for
from loracls.backends.fast.weights import EMBEDDINGS, LAYER_NORMS, check_complete, load_state, strip_prefix
from loracls.config import LoraSettings
from loracls.errors import LoraclsError
from loracls.families import Family

GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


# The frozen weights of one layer, by target: the three attention inputs are stacked as one [q; k; v] weight (in
# the table's qkv_slot order), the other targets keep a weight each.
QKV = ("query", "key", "value")
FROZEN = {"attention-output": "ao", "ffn-in": "fi", "ffn-out": "fo"}


def key(alias: str) -> str:
    """A ParameterDict key for a target (no dots or dashes)."""
    return alias.replace("-", "_")


class Layer(nn.Module):
    """One post-LayerNorm encoder layer: frozen fused weights as buffers, LoRA A/B as parameters."""

    def __init__(self, cfg: Any, family: Family, w: dict[str, torch.Tensor], targets: list[str], rank: int,
                 policy: ExecutionPolicy):
        super().__init__()
        H = cfg.hidden_size
        self.H, self.n_heads, self.eps = H, cfg.num_attention_heads, cfg.layer_norm_eps
        self.p_hidden, self.p_attn = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob
        self.gelu = GELU[cfg.hidden_act]
        self.policy, self.compute_dtype = policy, policy.storage_dtype
        t = family.targets
        qkv = sorted(QKV, key=lambda a: t[a].qkv_slot)
        weights = self._qkv_tensors([(w[f"{t[a].path}.weight"], w[f"{t[a].path}.bias"]) for a in qkv])
        for alias, name in FROZEN.items():
            weights[f"{name}_w"], weights[f"{name}_b"] = w[f"{t[alias].path}.weight"], w[f"{t[alias].path}.bias"]
        for i, ln in enumerate(LAYER_NORMS, 1):
            weights[f"ln{i}_w"], weights[f"ln{i}_b"] = w[f"{ln}.weight"], w[f"{ln}.bias"]
        for name, tensor in weights.items():
            self._keep(name, tensor)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for alias in targets:
            n_in, n_out = (families.dim(cfg, d) for d in t[alias].dims)
            self.A[key(alias)] = nn.Parameter(torch.empty(rank, n_in))
            self.B[key(alias)] = nn.Parameter(torch.zeros(n_out, rank))
        self.qkv_lora = [(t[a].qkv_slot, key(a)) for a in qkv if key(a) in self.A]  # (block in Wqkv, key)

    # How the weights are held: frozen, fused, in the compute dtype (FullLayer: trained, apart, fp32).
    def _qkv_tensors(self, qkv: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """(weight, bias) of q, k, v in slot order -> the tensors kept: one stacked [q; k; v] weight and bias."""
        return {"qkv_w": torch.cat([w for w, _ in qkv]), "qkv_b": torch.cat([b for _, b in qkv])}

    def _keep(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor.to(self.compute_dtype).contiguous(), persistent=False)

    def weight(self, name: str) -> torch.Tensor:
        """A weight or bias (`ao_w`, `ln1_b`, ...) in the compute dtype."""
        return getattr(self, name)

    def qkv_weights(self, blocks: range) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of the Q/K/V `blocks` (a range in 0..2), stacked, in the compute dtype."""
        rows = slice(blocks.start * self.H, blocks.stop * self.H)
        return self.qkv_w[rows], self.qkv_b[rows]

    def _linear(self, x: torch.Tensor, name: str, key: str, scale: float, p: float) -> torch.Tensor:
        """x W^T + b, plus s * B A drop(x) when `key` is adapted."""
        y = F.linear(x, self.weight(name + "_w"), self.weight(name + "_b"))
        if key in self.A:
            xd, s = lora_dropout(x, p, self.policy) if self.training and p > 0.0 else (x, 1.0)
            u = F.linear(xd, self.A[key].to(x.dtype))
            y.addmm_(u, self.B[key].to(x.dtype).t(), alpha=scale * s)  # in place: linear's backward never reads y
        return y

    def _qkv(self, x: torch.Tensor, blocks: range, scale: float, p: float) -> torch.Tensor:
        """x [M, H] -> the Q/K/V `blocks` (a range in 0..2) [M, len(blocks)*H], LoRA included where targeted.
        One GEMM for the frozen blocks and one (block-diagonal) for the targeted B matrices, added in place.  The
        A matrices: one GEMM when no dropout applies; in training with LoRA dropout, one per target, each on its
        own dropout of x, as PEFT does."""
        H = self.H
        y = F.linear(x, *self.qkv_weights(blocks))
        lora = [(i, k) for i, k in self.qkv_lora if i in blocks]
        if not lora:
            return y
        t, dt = len(lora), x.dtype
        if self.training and p > 0.0:  # an independent mask per target
            u, s = [], 1.0
            for _, k in lora:
                xd, s = lora_dropout(x, p, self.policy)
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
        y = y if idx is None else Pad.apply(y, idx, P)  # [P, c*H]
        ctx = []
        for g, yg in zip(groups, y.split(sizes) if len(groups) > 1 else [y]):
            m = g.e1 - g.e0
            yg = yg.view(m, g.L, c, n, d)
            k, v = yg[:, :, c - 2].transpose(1, 2), yg[:, :, c - 1].transpose(1, 2)  # [m, n, L, d] views
            if first_only:
                qg = qs[len(ctx)].view(m, 1, n, d).transpose(1, 2)
                ctx.append(attention(qg, k, v, g.mask, self.p_attn, training, self.policy).reshape(m, H))
            else:
                qg = yg[:, :, 0].transpose(1, 2)
                ctx.append(attention(qg, k, v, g.mask, self.p_attn, training, self.policy)
                           .transpose(1, 2).reshape(m * g.L, H))
        ctx = ctx[0] if len(ctx) == 1 else torch.cat(ctx)
        if not first_only and idx is not None:
            ctx = Unpad.apply(ctx, idx)
        res = x0 if first_only else x
        h = self._linear(ctx, "ao", "attention_output", scale, p_lora)
        x1 = F.layer_norm(res + dropout(h, self.p_hidden, training, self.policy), (H,), self.weight("ln1_w"),
                          self.weight("ln1_b"), self.eps)
        h = F.gelu(self._linear(x1, "fi", "ffn_in", scale, p_lora), approximate=self.gelu)
        h = self._linear(h, "fo", "ffn_out", scale, p_lora)
        return F.layer_norm(x1 + dropout(h, self.p_hidden, training, self.policy), (H,), self.weight("ln2_w"),
                            self.weight("ln2_b"), self.eps)


class FullLayer(Layer):
    """A layer of method full: every weight an fp32 parameter, q, k and v apart (each a tensor of transformers'
    model, so they save and load under its names), cast to the compute dtype and stacked where they are used, so
    that the gradients reach the fp32 masters (bf16 products, fp32 weights: what torch.autocast gives)."""

    def _qkv_tensors(self, qkv: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {f"qkv_{p}{i}": t for i, pair in enumerate(qkv) for p, t in zip("wb", pair)}

    def _keep(self, name: str, tensor: torch.Tensor) -> None:
        setattr(self, name, nn.Parameter(tensor.float().contiguous()))

    def weight(self, name: str) -> torch.Tensor:
        return getattr(self, name).to(self.compute_dtype)

    def qkv_weights(self, blocks: range) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.cat([self.weight(f"qkv_{p}{i}") for i in blocks]) for p in "wb")


class FastClassifier(Classifier):
    """A BERT/RoBERTa encoder with LoRA and a classification head.  Build it with FastBackend.build."""

    layer_class = Layer  # how a layer holds its weights: frozen here, trained in FastFullClassifier

    def __init__(self, cfg: Any, state: dict[str, torch.Tensor], num_labels: int, lora: LoraSettings,
                 device: torch.device, seed: int, policy: ExecutionPolicy | None = None):
        super().__init__()
        self.config, self.lora, self.num_labels = cfg, lora, num_labels
        self.model_type: str = cfg.model_type
        self.family = families.family_of(cfg)
        self.head_layout = self.family.head
        self.policy = policy or policy_for(device)
        self.precision = "bf16" if self.policy.storage_dtype == torch.bfloat16 else "fp32"
        self.scale = lora.scaling
        self.merged = False
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        # RoBERTa numbers real tokens from padding_idx + 1; with right padding that is a fixed slice of the table.
        self.pos_offset = self.pad_id + 1 if self.family.position_offset else 0
        self.max_len = cfg.max_position_embeddings - self.pos_offset
        self.p_hidden = cfg.hidden_dropout_prob
        cd = getattr(cfg, "classifier_dropout", None)
        self.p_head = cd if cd is not None else cfg.hidden_dropout_prob
        self.layout = self._adapter_layout(cfg, lora)
        check_complete(state, self.family, cfg.num_hidden_layers, cfg.model_type)

        g = torch.Generator().manual_seed(seed)
        self._embeddings(state)
        self._head(state, g, cfg, num_labels)
        self._layers(state, cfg, lora)
        self._named = self._init_lora(g)
        self._total = self._count_total(state)
        self.to(device)

    # -- building, step by step ------------------------------------------------------------------------------
    def _adapter_layout(self, cfg: Any, lora: LoraSettings) -> placement.AdapterLayout:
        """What PEFT would adapt on this model: lora.targets resolved against the family's linears."""
        names = [f"{self.family.prefix}.{self.family.layer.format(i)}.{t.path}"
                 for i in range(cfg.num_hidden_layers) for t in self.family.targets.values()]
        names += [self.head_layout.dense, self.head_layout.out]
        return placement.layout(lora, cfg, names, [self.head_layout.out.split(".")[0]])

    def _embeddings(self, state: dict[str, torch.Tensor]) -> None:
        dtype = self.policy.storage_dtype
        emb = {k: state[f"embeddings.{k}"].float() for k in (
            "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight")}
        self.register_buffer("word_emb", emb["word_embeddings.weight"].to(dtype), persistent=False)
        # Most tokens have type 0 (every single text's), so token_type[0] is folded into every position row; a
        # pair's second text adds its shift from type 0 (type_shift[y] = token_type[y] - token_type[0]).
        types = emb["token_type_embeddings.weight"]
        pos = emb["position_embeddings.weight"] + types[0]
        self.register_buffer("pos_emb", pos.to(dtype), persistent=False)
        shift = (types - types[0]).to(dtype) if types.shape[0] > 1 else None  # RoBERTa: one type, no shift
        self.register_buffer("type_shift", shift, persistent=False)
        self.has_types = shift is not None
        self.register_buffer("emb_ln_w", state["embeddings.LayerNorm.weight"].to(dtype), persistent=False)
        self.register_buffer("emb_ln_b", state["embeddings.LayerNorm.bias"].to(dtype), persistent=False)

    def _head(self, state: dict[str, torch.Tensor], g: torch.Generator, cfg: Any, num_labels: int) -> None:
        """The head, fp32: out(tanh(dense(h0))).  As transformers: weights from the checkpoint when it has them
        with the right shapes, else normal(0, initializer_range) and zero biases (drawn either way, so the seed
        gives the same LoRA init whatever the checkpoint holds).  A frozen dense (BERT's pooler; RoBERTa's
        identity under the linear and native-lora heads) is a buffer: tiny, and it runs on one token per
        example."""
        H, head = cfg.hidden_size, self.head_layout

        def linear(name: str, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
            w, b = torch.empty(n_out, n_in), torch.zeros(n_out)
            nn.init.normal_(w, 0.0, cfg.initializer_range, generator=g)
            name = name.removeprefix(f"{self.family.prefix}.")  # the checkpoint has the prefix stripped
            cw, cb = state.get(f"{name}.weight"), state.get(f"{name}.bias")
            if cw is not None and cb is not None and cw.shape == w.shape and cb.shape == b.shape:
                w, b = cw.float().clone(), cb.float().clone()
            return w, b

        dw, db = linear(head.dense, H, H)  # drawn even when replaced: same LoRA init for every head
        if self.layout.identity_keys is not None:
            dw, db = torch.eye(H), torch.zeros(H)
        if self.lora.head == "native" and (self.lora.full or not head.dense_pretrained):
            self.dense_w, self.dense_b = nn.Parameter(dw), nn.Parameter(db)
        else:
            self.register_buffer("dense_w", dw, persistent=False)
            self.register_buffer("dense_b", db, persistent=False)
        ow, ob = linear(head.out, H, num_labels)
        self.out_w, self.out_b = nn.Parameter(ow), nn.Parameter(ob)
        self.head_A = self.head_B = None
        if self.layout.head_lora is not None:  # native-lora: LoRA on the frozen dense, fp32
            self.head_A = nn.Parameter(torch.empty(self.lora.rank, H))
            self.head_B = nn.Parameter(torch.zeros(H, self.lora.rank))

    def _layers(self, state: dict[str, torch.Tensor], cfg: Any, lora: LoraSettings) -> None:
        by_path = {t.path: a for a, t in self.family.targets.items()}
        targets = [by_path[p] for p in self.layout.paths]
        adapted = set(range(cfg.num_hidden_layers)) if lora.layers is None else set(lora.layers)
        layers = []
        for i in range(cfg.num_hidden_layers):
            prefix = f"{self.family.layer.format(i)}."
            w = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
            layers.append(self.layer_class(cfg, self.family, w, targets if i in adapted else [], lora.rank,
                                           self.policy))
        self.layers = nn.ModuleList(layers)

    def _init_lora(self, g: torch.Generator) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors under PEFT's key names, in PEFT's order (layer, then module order, A before B,
        head last).  A is kaiming-uniform(a=sqrt(5)) as PEFT, drawn in this same order from the seeded
        generator."""
        named: list[tuple[str, nn.Parameter]] = []
        for i, layer in enumerate(self.layers):
            for alias, t in self.family.targets.items():
                if key(alias) in layer.A:
                    A, B = layer.A[key(alias)], layer.B[key(alias)]
                    nn.init.kaiming_uniform_(A.data, a=math.sqrt(5), generator=g)
                    base = f"base_model.model.{self.family.prefix}.{self.family.layer.format(i)}.{t.path}"
                    named += [(f"{base}.lora_A.weight", A), (f"{base}.lora_B.weight", B)]
        if self.head_A is not None:  # after the encoder, before the trained head: PEFT's module order
            nn.init.kaiming_uniform_(self.head_A.data, a=math.sqrt(5), generator=g)
            base = f"base_model.model.{self.layout.head_lora}"
            named += [(f"{base}.lora_A.weight", self.head_A), (f"{base}.lora_B.weight", self.head_B)]
        head = [(self.head_layout.out, self.out_w, self.out_b)]
        if isinstance(self.dense_w, nn.Parameter):
            head.insert(0, (self.head_layout.dense, self.dense_w, self.dense_b))
        for m, w, b in head:
            named += [(f"base_model.model.{m}.weight", w), (f"base_model.model.{m}.bias", b)]
        return named

    def _count_total(self, state: dict[str, torch.Tensor]) -> int:
        """PEFT's "all params": the plain seq-cls model (BERT: with pooler; RoBERTa: without) + LoRA + the trained
        head again (modules_to_save keeps a copy beside the original; for RoBERTa linear that copy holds the
        frozen dense too, since modules_to_save=["classifier"])."""
        base = sum(b.numel() for n, b in self.named_buffers() if n != "type_shift")  # the token types: below, once
        base += state["embeddings.token_type_embeddings.weight"].numel()
        base += sum(p.numel() for k, p in self._named if "lora_" not in k)
        if self.layout.identity_keys is not None and self.lora.head == "linear":
            base += self.dense_w.numel() + self.dense_b.numel()
        return base + sum(p.numel() for _, p in self._named)

    @property
    def device(self) -> torch.device:
        return self.word_emb.device

    # -- batching ---------------------------------------------------------------------------------------------
    def collate(self, token_ids: Sequence[Sequence[int]]) -> FastBatch:
        layout = PackLayout(self.pad_id, self.pos_offset, self.max_len, self.config.hidden_size,
                            token_types=self.has_types)
        return collate(token_ids, layout, self.device, self.policy)

    def eval_batches(self, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
        return eval_batches(lengths, batch_size, self.policy)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, batch: FastBatch) -> torch.Tensor:
        H, training = self.config.hidden_size, self.training
        word, pos, type_shift, ln_w, ln_b = self.embedding_tables()
        if batch.padded:
            x = F.embedding(batch.tokens, word) + F.embedding(batch.positions, pos)
        else:  # nothing padded: the packed rows are the padded ones
            B, L = batch.input_ids.shape
            x = F.embedding(batch.input_ids, word) + pos[self.pos_offset:self.pos_offset + L]
            x = x.view(B * L, H)
        if batch.types is not None:  # a pair's second text: token_type[1] in place of the token_type[0] folded in
            x = x + F.embedding(batch.types, type_shift)
        # the layers' dtype (method full looks up and normalizes in fp32, as its tables are)
        x = F.layer_norm(x, (H,), ln_w, ln_b, self.config.layer_norm_eps).to(self.policy.storage_dtype)
        x = dropout(x, self.p_hidden, training, self.policy)
        p_lora = 0.0 if self.merged else self.lora.dropout
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, self.scale, p_lora, first_only=i == len(self.layers) - 1)
        if batch.order is not None:  # packed order -> the caller's order
            x = x.index_select(0, batch.order)
        h0 = x.float()  # [B, H]: the first token; the head runs in fp32
        if self.head_layout.input_dropout:
            h0 = dropout(h0, self.p_head, training, self.policy)
        h = F.linear(h0, self.dense_w, self.dense_b)
        if self.head_A is not None:  # native-lora: s * B A drop(h0) on the pooler / classifier.dense
            h = h + self.scale * F.linear(F.linear(dropout(h0, p_lora, training, self.policy), self.head_A),
                                          self.head_B)
        return F.linear(dropout(torch.tanh(h), self.p_head, training, self.policy), self.out_w, self.out_b)

    def embedding_tables(self) -> tuple[torch.Tensor, ...]:
        """(word, position with token_type[0] folded in, token_type shift or None, LayerNorm weight, bias)."""
        return self.word_emb, self.pos_emb, self.type_shift, self.emb_ln_w, self.emb_ln_b

    # -- parameters, adapter format, merge --------------------------------------------------------------------
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(list(self._named))

    def _saved(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of the adapter file: the trainable ones, plus the frozen identity dense of the RoBERTa linear
        and native-lora heads (placed where PEFT's state dict has it: before classifier.out_proj)."""
        if self.layout.identity_keys is None:
            return list(self._named)
        frozen = list(zip(self.layout.identity_keys, (self.dense_w, self.dense_b)))
        i = next(i for i, (k, _) in enumerate(self._named) if k.startswith("base_model.model.classifier."))
        return self._named[:i] + frozen + self._named[i:]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under PEFT's saved key names (plus, for the RoBERTa linear / native-lora heads, the
        frozen identity classifier.dense), float32 on the CPU."""
        if self.merged:
            raise RuntimeError("adapter_state_dict() after merge(): the LoRA branch is gone")
        return cpu_copies(self._saved())

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.merged:
            raise RuntimeError("load_adapter_state_dict() after merge(): the LoRA branch is gone")
        copy_into(dict(self._saved()), state)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s * B @ A (computed in fp32) for every adapted linear; the LoRA parameters are then dropped."""
        if self.merged:
            raise RuntimeError("merge() was already called on this model")
        t = self.family.targets
        for layer in self.layers:
            H = layer.H
            rows = {key(a): ("qkv_w", slice(t[a].qkv_slot * H, (t[a].qkv_slot + 1) * H)) for a in QKV}
            rows.update({key(a): (f"{name}_w", slice(None)) for a, name in FROZEN.items()})
            for k in list(layer.A.keys()):
                name, sl = rows[k]
                w = getattr(layer, name)[sl]
                w.copy_((w.float() + self.scale * (layer.B[k].float() @ layer.A[k].float())).to(w.dtype))
            layer.A, layer.B, layer.qkv_lora = nn.ParameterDict(), nn.ParameterDict(), []
        if self.head_A is not None:
            self.dense_w.add_(self.scale * (self.head_B @ self.head_A))
            self.head_A = self.head_B = None
        self._named = [(k, p) for k, p in self._named if "lora_" not in k]
        self.merged = True

    def total_parameters(self) -> int:
        return self._total


# Method full's embedding parameters: attribute -> tensor under the encoder's `embeddings.`
FULL_EMBEDDINGS = dict(zip(("word_emb", "position_emb", "type_emb", "emb_ln_w", "emb_ln_b"), EMBEDDINGS))


class FastFullClassifier(FastClassifier):
    """Method full on the fast encoder: every weight of the encoder and the head is an fp32 parameter under
    transformers' own name (FullLayer), with the LoRA path's unpadding, attention groups and kernels.  It starts
    from transformers' own model (`state` is its state dict, the new head drawn as the peft backend draws it), so
    the two backends' full fine-tunes start equal, and each loads the other's saved weights."""

    layer_class = FullLayer

    def __init__(self, cfg: Any, state: dict[str, torch.Tensor], num_labels: int, lora: LoraSettings,
                 device: torch.device, seed: int, policy: ExecutionPolicy, names: list[str], classifier_config: dict):
        self._classifier_config = classifier_config  # read by _adapter_layout, which FastClassifier's __init__ calls
        super().__init__(cfg, state, num_labels, lora, device, seed, policy)
        mine = self._by_transformers_name()
        if set(mine) != set(names):
            odd = sorted(set(names) ^ set(mine))
            raise LoraclsError(f"the fast encoder does not hold the same weights as transformers' {cfg.model_type} "
                               f"model ({odd[0]}, and {len(odd) - 1} more); use --backend peft")
        self._named = [(n, mine[n]) for n in names]  # transformers' order: its optimizer state lines up too

    def _adapter_layout(self, cfg: Any, lora: LoraSettings) -> placement.WholeModel:
        return placement.WholeModel(self._classifier_config)

    def _embeddings(self, state: dict[str, torch.Tensor]) -> None:
        for name, key in FULL_EMBEDDINGS.items():
            setattr(self, name, nn.Parameter(state[f"embeddings.{key}"].float().clone()))
        self.has_types = self.type_emb.shape[0] > 1

    def embedding_tables(self) -> tuple[torch.Tensor, ...]:
        # fp32, as the tables are: rows are looked up before the cast to the compute dtype, so no step casts (or
        # takes the gradient of) the whole vocabulary in bf16
        types = self.type_emb
        shift = types - types[0] if self.has_types else None
        return self.word_emb, self.position_emb + types[0], shift, self.emb_ln_w, self.emb_ln_b

    def _by_transformers_name(self) -> dict[str, nn.Parameter]:
        fam, p = self.family, self.family.prefix
        out = {f"{p}.embeddings.{key}": getattr(self, name) for name, key in FULL_EMBEDDINGS.items()}
        for i, layer in enumerate(self.layers):
            base = f"{p}.{fam.layer.format(i)}"
            for alias, t in fam.targets.items():
                mine = f"qkv_{{}}{t.qkv_slot}" if t.qkv_slot is not None else f"{FROZEN[alias]}_{{}}"
                out[f"{base}.{t.path}.weight"] = getattr(layer, mine.format("w"))
                out[f"{base}.{t.path}.bias"] = getattr(layer, mine.format("b"))
            for j, ln in enumerate(LAYER_NORMS, 1):
                out[f"{base}.{ln}.weight"] = getattr(layer, f"ln{j}_w")
                out[f"{base}.{ln}.bias"] = getattr(layer, f"ln{j}_b")
        head = self.head_layout
        out.update({f"{head.dense}.weight": self.dense_w, f"{head.dense}.bias": self.dense_b,
                    f"{head.out}.weight": self.out_w, f"{head.out}.bias": self.out_b})
        return out

    def _count_total(self, state: dict[str, torch.Tensor]) -> int:
        return sum(p.numel() for p in self.parameters())

    def _saved(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._named)

    @torch.no_grad()
    def merge(self) -> None:
        """Nothing to fold in; for inference the layers' weights are stored in the compute dtype, so that no batch
        casts them again."""
        if self.merged:
            raise RuntimeError("merge() was already called on this model")
        for p in self.layers.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(self.policy.storage_dtype)
        self.merged = True


class FastBackend(Backend):
    name = "fast"

    def unsupported_reason(self, model_config: Any, lora: LoraSettings) -> str | None:
        fam = families.family_of(model_config)
        if fam is None or not fam.fast:
            fast = [t for f in families.FAMILIES if f.fast for t in f.model_types]
            return f"model type {getattr(model_config, 'model_type', None)!r} is not one of {', '.join(fast)}"
        pe = getattr(model_config, "position_embedding_type", None) or "absolute"
        if pe != "absolute":
            return f"position_embedding_type {pe!r} (only absolute positions are implemented)"
        act = getattr(model_config, "hidden_act", None)
        if act not in GELU:
            return f"activation {act!r} (only gelu is implemented)"
        if getattr(model_config, "is_decoder", False) or getattr(model_config, "add_cross_attention", False):
            return "decoder / cross-attention configs are not plain encoders"
        for name, value, plain in (("method", lora.method, "lora"), ("init", lora.init, "kaiming")):
            if value != plain and not lora.full:
                return f"{name} {value!r} is implemented in the peft backend"
        if lora.layer_ranks:
            return "per-layer ranks are implemented in the peft backend"
        if lora.full:  # no LoRA: the targets are not read
            return None
        paths = {t.path for t in fam.targets.values()}
        raw = [t for t in lora.targets if t not in families.ALIASES and t != families.ALL_LINEAR
               and not any(p == t or p.endswith("." + t) for p in paths)]
        if raw:
            return f"target {raw[0]!r} is none of the linear layers it implements"
        return None

    def build(self, model_dir: str, model_config: Any, num_labels: int, lora: LoraSettings, device: torch.device, *,
              seed: int, trust_remote_code: bool = False, precision: str | None = None,
              policy: ExecutionPolicy | None = None) -> FastClassifier:
        cfg = model_config
        reason = self.unsupported_reason(cfg, lora)
        if reason:
            raise LoraclsError(f"the fast backend cannot run {model_dir}: {reason}; use --backend peft")
        if lora.layers is not None and max(lora.layers) >= cfg.num_hidden_layers:
            raise LoraclsError(f"lora.layers has index {max(lora.layers)} but the model has "
                               f"{cfg.num_hidden_layers} layers (0..{cfg.num_hidden_layers - 1})")
        folder = Path(model_dir)
        policy = policy or policy_for(device, precision)
        if lora.full:
            model = pretrained_classifier(model_dir, cfg, num_labels, seed, trust_remote_code)
            names = [n for n, _ in model.named_parameters()]
            state = strip_prefix(model.state_dict(), folder)
            return FastFullClassifier(cfg, state, num_labels, lora, torch.device(device), seed, policy, names,
                                      model.config.to_dict())
        state = strip_prefix(load_state(folder), folder)
        return FastClassifier(cfg, state, num_labels, lora, torch.device(device), seed, policy)


__all__ = ["FastBackend", "FastClassifier", "FastFullClassifier", "FastBatch", "AttnGroup"]
