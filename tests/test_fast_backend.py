"""The fast backend against the real thing: transformers + PEFT with the same weights and adapter.

Every numeric check compares with `AutoModelForSequenceClassification` + `peft.get_peft_model`, never with the
fast backend itself.  Adapters travel in both directions under PEFT's own saved key names."""

from __future__ import annotations

import math
import re

import pytest
import torch

from helpers import with_dropout
from loracls.backends.base import Classifier
from loracls.backends.fast import CPU as CPU_POLICY
from loracls.backends.fast import CPU_BF16 as CPU_BF16_POLICY
from loracls.backends.fast import CUDA as CUDA_POLICY
from loracls.backends.fast import FastBackend, FastClassifier, kernels, packing
from loracls.backends.fast import model as fast_model
from loracls.backends.peft import PeftClassifier
from loracls.config import LoraSettings
from loracls.errors import LoraclsError
from loracls.models import read_model_config

CPU = torch.device("cpu")
TEXTS = [
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "Hi",
    "The home team won the championship in overtime, their first title in twenty years of trying.",
    "New chip promises faster phones.",
    "Rain.",
]
# Very different lengths (3 to ~140 tokens), two of them equal: padding dominates a plain padded batch.
RAGGED = TEXTS + [
    "Markets " + "rallied and then slipped back as traders weighed the outlook for growth, " * 9 + "analysts said.",
    "Hi",
    "The match was postponed because of heavy rain and will be replayed next week.",
]
SIX = ["query", "key", "value", "attention-output", "ffn-in", "ffn-out"]
ALL_SIX = LoraSettings(rank=4, alpha=8.0, dropout=0.1, targets=SIX)
SUBSET_RS = LoraSettings(rank=3, alpha=5.0, dropout=0.0, targets=["key", "value", "ffn-out"], layers=[1],
                         rslora=True)
# The BERT-family module paths, written out here (not taken from loracls) for the reference PEFT model.
PATHS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
         "attention-output": "attention.output.dense", "ffn-in": "intermediate.dense", "ffn-out": "output.dense"}
# The execution policies (backends/fast/policy.py): the CUDA one runs here on the CPU, bf16 storage included, so
# every CUDA branch is tested; so does the CPU's bf16 one on any CPU.  Their tolerances suit bf16 (8 mantissa bits).
POLICIES = {"cpu": CPU_POLICY, "cpu-bf16": CPU_BF16_POLICY, "cuda": CUDA_POLICY}
LOGIT_TOL = {"cpu": 1e-4, "cpu-bf16": 0.08, "cuda": 0.08}


# -- helpers ----------------------------------------------------------------------------------------------------

def _peft_model(model_dir, lora: LoraSettings, num_labels=4, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
    layers = r"\d+" if lora.layers is None else "(?:" + "|".join(map(str, lora.layers)) + ")"
    regex = rf".*\.layer\.{layers}\.(?:{'|'.join(re.escape(PATHS[t]) for t in lora.targets)})"
    cfg = LoraConfig(task_type="SEQ_CLS", r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     use_rslora=lora.rslora, target_modules=regex)
    return get_peft_model(base, cfg).eval()


def _randomize_peft(pm, seed=1):
    """Non-zero B (so LoRA matters) and a head with visible logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or ("classifier" in name and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _tokens(model_dir, texts=TEXTS):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok(list(texts))["input_ids"], tok(list(texts), padding=True, return_tensors="pt")


def _fast(model_dir, lora, num_labels=4, seed=0, policy="cpu") -> FastClassifier:
    return FastBackend().build(str(model_dir), read_model_config(str(model_dir)), num_labels, lora, CPU, seed=seed,
                               policy=POLICIES[policy]).eval()


@torch.no_grad()
def _fast_logits(fm, ids):
    return fm(fm.collate(ids))


@torch.no_grad()
def _peft_logits(pm, enc):
    return pm(**enc).logits


def _check_against_peft(model_dir, lora, texts=TEXTS, policy="cpu"):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    tol = LOGIT_TOL[policy]
    ids, enc = _tokens(model_dir, texts)
    pm = _peft_model(model_dir, lora)
    _randomize_peft(pm)
    ref = _peft_logits(pm, enc)
    assert ref.abs().max() > 0.1  # the comparison means something

    # PEFT -> fast
    fm = _fast(model_dir, lora, policy=policy)
    fm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    out = _fast_logits(fm, ids)
    assert out.dtype == torch.float32 and out.shape == (len(texts), 4)
    assert (out - ref).abs().max().item() <= tol

    # fast -> PEFT: a fresh fast model (its own seeded A) with random B and head, read by PEFT
    fm2 = _fast(model_dir, lora, seed=7, policy=policy)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in fm2.trainable_named_parameters():
            if "lora_A" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm2 = _peft_model(model_dir, lora, seed=5)
    set_peft_model_state_dict(pm2, fm2.adapter_state_dict())
    assert (_fast_logits(fm2, ids) - _peft_logits(pm2, enc)).abs().max().item() <= tol

    # merged: same logits, LoRA gone
    fm.merge()
    assert fm.merged and not any("lora_" in n for n, _ in fm.trainable_named_parameters())
    assert (_fast_logits(fm, ids) - ref).abs().max().item() <= tol
    with pytest.raises(RuntimeError):
        fm.merge()
    return pm, fm


# -- equivalence with transformers + PEFT -----------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("lora", [ALL_SIX, SUBSET_RS], ids=["all-six", "layer1-kv-out-rslora"])
def test_matches_peft_tiny(tiny_model_dir, lora, policy):
    pm, fm = _check_against_peft(tiny_model_dir, lora, policy=policy)
    assert fm.layers[0].qkv_w.dtype == POLICIES[policy].storage_dtype


def test_all_linear_is_the_six_targets(tiny_model_dir):
    a = _fast(tiny_model_dir, LoraSettings(targets=["all-linear"]), seed=2).adapter_state_dict()
    b = _fast(tiny_model_dir, LoraSettings(targets=SIX), seed=2).adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_matches_peft_minilm(minilm_dir):
    lora = LoraSettings(rank=8, alpha=16.0, targets=SIX, layers=[0, 4, 5], rslora=True)
    _check_against_peft(minilm_dir, lora, texts=TEXTS[:3])


def test_parameter_counts_match_peft(tiny_model_dir):
    for lora in (ALL_SIX, SUBSET_RS):
        pm = _peft_model(tiny_model_dir, lora)
        trainable, total = pm.get_nb_trainable_parameters()
        assert _fast(tiny_model_dir, lora).count_parameters() == (trainable, total)


def test_adapter_keys_are_peft_keys(tiny_model_dir):
    from peft import get_peft_model_state_dict

    pm = _peft_model(tiny_model_dir, ALL_SIX)
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    fm = _fast(tiny_model_dir, ALL_SIX)
    got = {k: tuple(v.shape) for k, v in fm.adapter_state_dict().items()}
    assert got == want
    assert [n for n, _ in fm.trainable_named_parameters()] == list(fm.adapter_state_dict())
    # PEFT's order too: layer by layer, module order, A before B, head last
    peft_order = [n.replace(".default", "").replace(".modules_to_save", "") for n, p in pm.named_parameters()
                  if p.requires_grad]
    assert [n for n, _ in fm.trainable_named_parameters()] == peft_order


def test_zero_b_is_the_base_model_with_the_same_head(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    fm = _fast(tiny_model_dir, ALL_SIX, seed=3)
    state = fm.adapter_state_dict()
    assert all(v.abs().max() == 0 for k, v in state.items() if "lora_B" in k)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=4).eval()
    head = {k.removeprefix("base_model.model."): v for k, v in state.items() if "lora_" not in k}
    missing, unexpected = base.load_state_dict(head, strict=False)
    assert not unexpected
    ids, enc = _tokens(tiny_model_dir)
    with torch.no_grad():
        ref = base(**enc).logits
    assert (_fast_logits(fm, ids) - ref).abs().max().item() <= 1e-5


def test_xlm_roberta_uses_the_roberta_prefix(tmp_path):
    from peft import get_peft_model_state_dict
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1)
    XLMRobertaModel(cfg).save_pretrained(tmp_path)
    lora = LoraSettings(rank=2, alpha=4.0, targets=["query", "value"])
    pm = _peft_model(tmp_path, lora)
    _randomize_peft(pm)
    fm = _fast(tmp_path, lora)
    prefixes = ("base_model.model.roberta.", "base_model.model.classifier.")
    assert all(k.startswith(prefixes) for k in fm.adapter_state_dict())
    fm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    ids = [[0, 5, 6, 7, 8, 2], [0, 9, 2], [0] + list(range(10, 72)) + [2]]  # the last one uses all 64 positions
    enc = {"input_ids": torch.tensor([x + [1] * (64 - len(x)) for x in ids]),
           "attention_mask": torch.tensor([[1] * len(x) + [0] * (64 - len(x)) for x in ids])}
    assert (_fast_logits(fm, ids) - _peft_logits(pm, enc)).abs().max().item() <= 1e-4
    with pytest.raises(LoraclsError, match="at most 64"):
        fm.collate([[0] * 65])


# -- loading checkpoints ----------------------------------------------------------------------------------------

def test_prefixed_pytorch_bin_checkpoint(tiny_bert_dir, tmp_path):
    """A `bert.`-prefixed pytorch_model.bin with old gamma/beta LayerNorm names loads to the same model."""
    import shutil

    from safetensors.torch import load_file

    state = load_file(str(tiny_bert_dir / "model.safetensors"))
    state = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in state.items()}
    state["cls.predictions.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(tiny_bert_dir / "config.json", tmp_path / "config.json")
    a, b = _fast(tiny_bert_dir, ALL_SIX, seed=1), _fast(tmp_path, ALL_SIX, seed=1)
    ids, _ = _tokens(tiny_bert_dir)
    assert torch.equal(_fast_logits(a, ids), _fast_logits(b, ids))

    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(LoraclsError, match="encoder.layer.1.output.dense.weight"):
        _fast(tmp_path, ALL_SIX)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(LoraclsError, match="no model.safetensors"):
        _fast(tmp_path, ALL_SIX)


def test_load_adapter_rejects_missing_and_misshaped(tiny_bert_dir):
    fm = _fast(tiny_bert_dir, ALL_SIX)
    state = fm.adapter_state_dict()
    key = next(k for k in state if "lora_A" in k)
    with pytest.raises(LoraclsError, match="lacks"):
        fm.load_adapter_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(LoraclsError, match="shape"):
        fm.load_adapter_state_dict({**state, key: torch.zeros(5, 32)})
    with pytest.raises(LoraclsError, match="unexpected"):
        fm.load_adapter_state_dict({**state, "base_model.model.bert.pooler.dense.lora_A.weight": torch.zeros(4, 32)})


# -- init, training, batching -----------------------------------------------------------------------------------

def test_init_is_peft_like_and_seeded(tiny_roberta_dir):
    a, b, c = (_fast(tiny_roberta_dir, ALL_SIX, seed=s).adapter_state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for k, v in a.items():
        if "lora_A" in k:
            assert v.abs().max() <= 1 / math.sqrt(v.shape[1]) and v.std() > 0  # kaiming_uniform(a=sqrt(5)) bound
        elif "lora_B" in k or k.endswith(".bias"):
            assert v.abs().max() == 0
        else:  # head weights: normal(0, initializer_range)
            assert 0.01 < v.std() < 0.03


@pytest.mark.parametrize("policy", POLICIES)
def test_optimizer_step_changes_only_trainable(tiny_model_dir, policy):
    fm = _fast(tiny_model_dir, ALL_SIX, policy=policy).train()
    assert {id(p) for p in fm.parameters()} == {id(p) for _, p in fm.trainable_named_parameters()}
    frozen = {n: b.clone() for n, b in fm.named_buffers()}
    before = {n: p.detach().clone() for n, p in fm.trainable_named_parameters()}
    opt = torch.optim.AdamW([p for _, p in fm.trainable_named_parameters()], lr=1e-2)
    ids, _ = _tokens(tiny_model_dir)
    torch.manual_seed(0)
    for _ in range(2):  # step 1 moves B off zero, so step 2 gives A a gradient too
        loss = torch.nn.functional.cross_entropy(fm(fm.collate(ids)), torch.tensor([0, 1, 2, 3, 0]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(frozen[n], b) for n, b in fm.named_buffers())
    assert all(not torch.equal(before[n], p) for n, p in fm.trainable_named_parameters())


@pytest.mark.parametrize("policy", POLICIES)
def test_train_mode_dropout_is_random_and_eval_is_not(tiny_bert_dir, policy):
    fm = _fast(tiny_bert_dir, ALL_SIX, policy=policy)
    ids, _ = _tokens(tiny_bert_dir)
    batch = fm.collate(ids)
    with torch.no_grad():
        fm.train()
        a, b = fm(batch), fm(batch)
        fm.eval()
        c, d = fm(batch), fm(batch)
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_padding_invariance(tiny_model_dir):
    from peft import get_peft_model_state_dict

    pm = _peft_model(tiny_model_dir, ALL_SIX)
    _randomize_peft(pm)
    fm = _fast(tiny_model_dir, ALL_SIX)
    fm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    ids, _ = _tokens(tiny_model_dir, RAGGED)
    batch = fm.collate(ids)
    assert batch.padded and batch.input_ids.shape == (len(ids), max(map(len, ids)))
    together = _fast_logits(fm, ids)
    for i, x in enumerate(ids):
        assert not fm.collate([x]).padded
        assert (_fast_logits(fm, [x])[0] - together[i]).abs().max().item() <= 1e-5
    same = fm.collate([ids[0], ids[0]])
    assert not same.padded and same.idx is None and same.groups == ()


# -- unpadding ----------------------------------------------------------------------------------------------------

def _cuts(*cuts):
    """A stand-in for packing.attention_groups that always cuts the sorted batch at `cuts` (clipped to its size)."""
    def pick(lengths, hidden, group_cost):
        return [0] + [c for c in cuts if 0 < c < len(lengths)] + [len(lengths)]
    return pick


# Attention groupings to check: one group (the CUDA layout, caller's order), the cost model's own, every distinct
# length its own group (free groups), and forced cuts that leave padding inside groups.
GROUPINGS = ["one-group", "cost-model", "per-length", "cuts-2-5"]


def _use_grouping(monkeypatch, grouping):
    if grouping == "one-group":
        monkeypatch.setattr(packing, "GROUP_COST", math.inf)
    elif grouping == "per-length":
        monkeypatch.setattr(packing, "GROUP_COST", 0.0)
    elif grouping == "cuts-2-5":
        monkeypatch.setattr(packing, "attention_groups", _cuts(2, 5))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_unpadded_forward_matches_peft_on_ragged_batch(tiny_model_dir, grouping, monkeypatch):
    _use_grouping(monkeypatch, grouping)
    pm, fm = _check_against_peft(tiny_model_dir, ALL_SIX, texts=RAGGED)
    batch = fm.collate(_tokens(tiny_model_dir, RAGGED)[0])
    assert batch.padded and batch.tokens.numel() < batch.input_ids.numel() / 2  # mostly padding, none computed
    assert (len(batch.groups) == 1) == (grouping == "one-group")


@pytest.mark.parametrize("grouping,policy", [("one-group", "cpu"), ("cost-model", "cpu"), ("cuts-2-5", "cpu"),
                                             ("cost-model", "cpu-bf16"), ("cost-model", "cuda")])
def test_train_mode_loss_and_grads_without_dropout(no_dropout_dir, grouping, policy, monkeypatch):
    """Train mode, dropout 0: the unpadded forward/backward on a ragged batch gives PEFT's loss and gradients on
    the padded batch, and the mean of the losses of each example run alone (no padding anywhere).  Under the
    CUDA policy (bf16 storage, one attention group) within bf16's tolerance."""
    from peft import get_peft_model_state_dict

    _use_grouping(monkeypatch, grouping)
    tol = dict(atol=1e-5, rtol=1e-4) if policy == "cpu" else dict(atol=2e-2, rtol=0.1)  # bf16: 8 mantissa bits
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, targets=SIX)
    pm = _peft_model(no_dropout_dir, lora)
    _randomize_peft(pm)
    fm = _fast(no_dropout_dir, lora, policy=policy).train()
    fm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    pm.train()
    ids, enc = _tokens(no_dropout_dir, RAGGED)
    y = torch.arange(len(ids)) % 4

    loss = torch.nn.functional.cross_entropy(fm(fm.collate(ids)), y)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(pm(**enc).logits, y)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= tol["atol"]
    peft_grads = {n.replace(".default", "").replace(".modules_to_save", ""): p.grad
                  for n, p in pm.named_parameters() if p.requires_grad}
    for name, p in fm.trainable_named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        scale = peft_grads[name].abs().max()
        assert torch.allclose(p.grad, peft_grads[name], atol=tol["atol"] * max(1.0, scale.item()),
                              rtol=tol["rtol"]), name
    with torch.no_grad():
        alone = torch.stack([torch.nn.functional.cross_entropy(fm(fm.collate([x])), y[i:i + 1])
                             for i, x in enumerate(ids)])
    assert abs(loss.item() - alone.mean().item()) <= tol["atol"]


@pytest.fixture
def heavy_dropout_dir(tiny_model_dir, tmp_path):
    """The tiny model with hidden and attention dropout 0.3, so that dropout shapes the gradients."""
    return with_dropout(tiny_model_dir, tmp_path / "heavy-dropout", 0.3)


@pytest.mark.parametrize("policy", POLICIES)
def test_train_mode_gradients_with_dropout_match_peft_in_expectation(heavy_dropout_dir, policy):
    """With every dropout on (hidden, attention, head, LoRA input: the fast backend draws its own masks, in its own
    way), the stochastic gradients must have PEFT's distribution: over many draws, the mean gradient of every
    trainable element agrees within Monte-Carlo error, and so does the total variance.  A missing 1/(1-p) (checked:
    mean |z| 1.12) or a dropout in the wrong place shifts the means.  (Masks shared where PEFT draws independent
    ones leave the means alone; test_qkv_lora_dropout_masks_are_independent covers those.)"""
    import torch.nn.functional as F
    from peft import get_peft_model_state_dict

    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.3, targets=SIX)
    ids, enc = _tokens(heavy_dropout_dir, RAGGED)
    y = torch.arange(len(ids)) % 4
    pm = _peft_model(heavy_dropout_dir, lora)
    _randomize_peft(pm)
    fm = _fast(heavy_dropout_dir, lora, policy=policy)
    fm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    pm.train()
    fm.train()
    p_params = [p for p in pm.parameters() if p.requires_grad]
    p_names = [n for n, p in pm.named_parameters() if p.requires_grad]
    f_by_name = dict(fm.trainable_named_parameters())
    f_params = [f_by_name[n.replace(".modules_to_save.default", "").replace(".default", "")] for n in p_names]

    def draws(loss_fn, params, k=200 if policy == "cpu" else 100):
        torch.manual_seed(11)
        return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(), params)])
                            for _ in range(k)])

    gf = draws(lambda: F.cross_entropy(fm(fm.collate(ids)), y), f_params)
    gp = draws(lambda: F.cross_entropy(pm(**enc).logits, y), p_params)
    k = gf.shape[0]
    se = ((gf.var(0) + gp.var(0)) / k).sqrt()
    live = se > 1e-9
    z = ((gf.mean(0) - gp.mean(0))[live] / se[live]).abs()
    assert live.sum() > 1000
    # unbiased: |z| of a standard normal averages 0.80, and beyond 4 happens once in 16,000.  bf16 storage (the
    # CUDA policy) adds a small bias of its own, hence its looser bound.
    limit = 0.95 if policy == "cpu" else 1.05
    assert z.mean() < limit and (z > 4).float().mean() < 0.005, (z.mean().item(), (z > 4).float().mean().item())
    spread = (gf.var(0)[live].sum() / gp.var(0)[live].sum()).item()
    assert 0.8 < spread < 1.25, spread


def test_cpu_training_attention_matches_autograd_reference():
    """kernels.TrainAttention (in-place softmax, bool dropout mask, hand-written backward) against autograd through
    the plain ops with the same dropout mask, for a padded [B, n, L, d] block and for first-token queries."""
    torch.manual_seed(0)
    B, n, L, d, p = 3, 4, 7, 5, 0.3
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., 4:] = False
    mask[2, ..., 1:] = False  # one real key only
    for Lq in (L, 1):
        q = torch.randn(B, n, Lq, d, dtype=torch.double, requires_grad=True)
        kv = torch.randn(B, L, 2, n, d, dtype=torch.double, requires_grad=True)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # strided views, as in the model
        g = torch.randn(B, n, Lq, d, dtype=torch.double)
        torch.manual_seed(5)
        out = kernels.attention(q, k, v, mask, p, True, CPU_POLICY)
        grads = torch.autograd.grad(out, (q, kv), g)
        torch.manual_seed(5)
        bits, threshold, scale = kernels.keep_bits((B, n, Lq, L), p)
        keep = (bits >= threshold).double() * scale
        assert 0.1 < (keep == 0).double().mean() < 0.5
        s = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        ref = (torch.softmax(s, -1) * keep) @ v
        assert torch.allclose(out, ref, atol=1e-12)
        for a, b in zip(grads, torch.autograd.grad(ref, (q, kv), g)):
            assert torch.allclose(a, b, atol=1e-12)


def test_qkv_lora_dropout_masks_are_independent(tiny_bert_dir, monkeypatch):
    """As PEFT: each targeted q/k/v draws its own LoRA-dropout mask (one call per target and layer)."""
    calls = []
    real = fast_model.lora_dropout

    def spy(x, p, policy):
        out, s = real(x, p, policy)
        calls.append((x.shape, out == 0))
        return out, s

    monkeypatch.setattr(fast_model, "lora_dropout", spy)
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.5, targets=["query", "key", "value"])
    fm = _fast(tiny_bert_dir, lora).train()
    ids, _ = _tokens(tiny_bert_dir, RAGGED)
    fm(fm.collate(ids))
    n = sum(len(i) for i in ids)
    # layer 0: q, k and v on all tokens; the last layer: q on the first tokens, k and v on all tokens
    assert [c[0][0] for c in calls] == [n, n, n, len(ids), n, n]
    assert not torch.equal(calls[0][1], calls[1][1]) and not torch.equal(calls[1][1], calls[2][1])
    calls.clear()
    fm.eval()
    fm(fm.collate(ids))
    assert not calls  # no dropout in eval


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_collate_structures_are_consistent(tiny_roberta_dir, grouping, monkeypatch):
    _use_grouping(monkeypatch, grouping)
    fm = _fast(tiny_roberta_dir, ALL_SIX)
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(3, 90, (13,), generator=g)] + [40, 40, 2]
    ids = [[1000 + 7 * b + t for t in range(n)] for b, n in enumerate(lengths)]
    batch = fm.collate(ids)
    B, L, N = len(ids), max(lengths), sum(lengths)
    assert batch.padded and batch.input_ids.shape == (B, L)
    for b, x in enumerate(ids):  # right-padded, the caller's order
        assert batch.input_ids[b].tolist() == x + [fm.pad_id] * (L - len(x))
    order = batch.order.tolist() if batch.order is not None else list(range(B))
    packed = sorted(range(B), key=lambda b: order[b])  # packed position -> caller's example
    assert sorted(order) == list(range(B))
    assert batch.tokens.tolist() == [t for b in packed for t in ids[b]]
    assert batch.positions.tolist() == [fm.pos_offset + t for b in packed for t in range(lengths[b])]
    starts = [sum(lengths[packed[j]] for j in range(i)) for i in range(B)]
    assert batch.first.tolist() == starts and batch.tokens[batch.first].tolist() == [ids[b][0] for b in packed]
    # the groups tile the packed examples; idx puts every real token at (example, t) of its group's [m, L] block
    assert [gr.e0 for gr in batch.groups] == [0] + [gr.e1 for gr in batch.groups[:-1]] and batch.groups[-1].e1 == B
    want = []
    base = 0
    for gr in batch.groups:
        m, lens = gr.e1 - gr.e0, [lengths[packed[j]] for j in range(gr.e0, gr.e1)]
        assert gr.L == max(lens)
        keep = torch.arange(gr.L) < torch.tensor(lens)[:, None]
        assert (gr.mask is None) == bool(keep.all())
        if gr.mask is not None:
            assert gr.mask.shape == (m, 1, 1, gr.L) and torch.equal(gr.mask.view(m, gr.L), keep)
        want += [base + j * gr.L + t for j in range(m) for t in range(lens[j])]
        base += m * gr.L
    if batch.idx is None:
        assert all(gr.mask is None for gr in batch.groups) and want == list(range(N))
    else:
        assert batch.idx.tolist() == want and len(set(want)) == N


def test_attention_groups_cost_model():
    best = packing.attention_groups
    assert best([9, 9, 9], 32, 0.0) == [0, 3]  # no length change, nowhere to cut
    assert best([100, 50, 40, 3], 32, math.inf) == [0, 4]  # CUDA: one group
    assert best([100, 50, 40, 3], 32, 0.0) == [0, 1, 2, 3, 4]  # free groups: one per length
    assert best([100, 99, 3], 1, 1e9) == [0, 3]  # a group costs more than any padding
    lengths = [120, 118, 90, 60, 60, 59, 31, 30, 8]
    cuts = best(lengths, 384, packing.GROUP_COST)

    def cost(c):
        return sum((b - a) * lengths[a] ** 2 * 384 + packing.GROUP_COST for a, b in zip(c, c[1:]))

    import itertools
    inner = range(1, len(lengths))
    assert cost(cuts) == min(cost([0, *sub, len(lengths)]) for r in range(len(lengths))
                             for sub in itertools.combinations(inner, r))


def test_train_batches_are_the_peft_backends_random_batches():
    """No length grouping (it biased the gradients): the base class's random permutation, so the same seed gives
    the fast and the peft backend the same batches."""
    lengths = [int(x) for x in torch.randint(3, 200, (1234,), generator=torch.Generator().manual_seed(0))]
    fm = FastClassifier.__new__(FastClassifier)  # batching needs no weights
    # One implementation for both backends is what makes a seed give them the same batches.
    assert FastClassifier.train_batches is Classifier.train_batches
    assert PeftClassifier.train_batches is Classifier.train_batches
    tb = fm.train_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert sorted(i for b in tb for i in b) == list(range(len(lengths)))
    assert all(0 < len(b) <= 16 for b in tb)
    assert tb != fm.train_batches(lengths, 16, torch.Generator().manual_seed(2))
    torch.nn.Module.__init__(fm)
    fm.policy = CPU_POLICY
    for bs in (1, 64, 1000):
        eb = fm.eval_batches(lengths, bs)
        assert sorted(i for b in eb for i in b) == list(range(len(lengths)))
        assert all(0 < len(b) <= bs for b in eb)
        # longest first, and on the CPU no batch over the token cap unless one example alone is
        assert [lengths[i] for b in eb for i in b] == sorted(lengths, reverse=True)
        assert all(len(b) == 1 or sum(lengths[i] for i in b) <= CPU_POLICY.eval_token_cap for b in eb)
    assert max(len(b) for b in fm.eval_batches(lengths, 1000)) > 1
    assert fm.eval_batches([CPU_POLICY.eval_token_cap + 5, 3, 3], 64) == [[0], [1, 2]]
    fm.policy = CUDA_POLICY  # no token cap: batches of batch_size, longest first
    assert [len(b) for b in fm.eval_batches(lengths, 1000)] == [1000, 234]


def test_unsupported_reason(tiny_bert_dir, tiny_roberta_dir):
    from transformers import AutoConfig

    be = FastBackend()
    assert be.name == "fast"
    for d in (tiny_bert_dir, tiny_roberta_dir):
        assert be.unsupported_reason(AutoConfig.from_pretrained(str(d)), ALL_SIX) is None
    cfg = AutoConfig.from_pretrained(str(tiny_bert_dir))
    cfg.hidden_act = "relu"
    assert "relu" in be.unsupported_reason(cfg, ALL_SIX)
    cfg = AutoConfig.from_pretrained(str(tiny_bert_dir))
    cfg.position_embedding_type = "relative_key"
    assert "relative_key" in be.unsupported_reason(cfg, ALL_SIX)
    cfg.model_type = "distilbert"
    assert "distilbert" in be.unsupported_reason(cfg, ALL_SIX)
    cfg = AutoConfig.from_pretrained(str(tiny_bert_dir))
    assert be.unsupported_reason(cfg, LoraSettings(head="linear")) is None
    assert be.unsupported_reason(cfg, LoraSettings(head="native-lora")) is None
    with pytest.raises(LoraclsError, match="lora.layers"):
        be.build(str(tiny_bert_dir), cfg, 4, LoraSettings(layers=[2]), CPU, seed=0)
    assert "Wqkv" in be.unsupported_reason(cfg, LoraSettings(targets=["Wqkv"]))
    assert be.unsupported_reason(cfg, LoraSettings(targets=["attention.self.query"])) is None


def test_head_saved_in_the_checkpoint_is_used_like_transformers(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=4)
    with torch.no_grad():
        clf.classifier.weight.normal_(0, 1.0)
    clf.save_pretrained(tmp_path)  # keys: bert.* plus classifier.*
    fm = _fast(tmp_path, ALL_SIX)
    assert torch.equal(fm.adapter_state_dict()["base_model.model.classifier.weight"], clf.classifier.weight)
    ids, enc = _tokens(tiny_bert_dir)
    with torch.no_grad():
        assert (_fast_logits(fm, ids) - clf.eval()(**enc).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("policy", ["cuda", "cpu-bf16"])
def test_bf16_policies_storage_merge_and_reload(tiny_roberta_dir, tmp_path, policy):
    """The bf16 policies (CUDA's, and the CPU's of --precision bf16) on the CPU: bf16 frozen weights, fp32 LoRA, head and logits; save/load round-trips
    exactly; merge keeps the logits within bf16's precision."""
    from helpers import save_adapter

    from loracls import peft_format

    ref = _fast(tiny_roberta_dir, ALL_SIX, seed=4)
    fm = _fast(tiny_roberta_dir, ALL_SIX, seed=4, policy=policy)
    assert fm.layers[0].qkv_w.dtype == torch.bfloat16 and fm.word_emb.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in fm.trainable_named_parameters())
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.3 if "lora_A" not in k else v)
             for k, v in ref.adapter_state_dict().items()}
    ref.load_adapter_state_dict(state)
    fm.load_adapter_state_dict(state)
    ids, _ = _tokens(tiny_roberta_dir, RAGGED)
    out = _fast_logits(fm, ids)
    assert out.dtype == torch.float32
    assert (out - _fast_logits(ref, ids)).abs().max().item() < LOGIT_TOL[policy]
    save_adapter(fm, ALL_SIX, tmp_path)
    other = _fast(tiny_roberta_dir, ALL_SIX, seed=9, policy=policy)
    other.load_adapter_state_dict(peft_format.read_adapter(tmp_path)[1])
    assert torch.equal(_fast_logits(other, ids), out)
    fm.train()
    fm(fm.collate(ids)).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in fm.trainable_named_parameters())
    fm.eval().merge()
    assert (_fast_logits(fm, ids) - out).abs().max().item() < LOGIT_TOL[policy]
    if policy == "cuda":
        assert len(fm.collate(ids).groups) == 1  # one attention group per batch under the CUDA policy
