"""The head variants linear and native-lora (config.HEAD_CHOICES) in both backends, checked against plan.py's counts
and against PEFT reading the saved adapter (the path `loracls export` takes)."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

from helpers import build_model, save_adapter
from loracls import peft_format, placement
from loracls.config import LoraSettings
from loracls.models import load_tokenizer
from loracls.planning import count

TEXTS = ["Stocks rallied on Wall Street after the Fed kept rates unchanged.",
         "The Yankees beat the Red Sox 5-3.",
         "A new chip from Intel doubles the speed of laptops while using less power, the company said on Monday.",
         "Oil"]
BACKENDS = ["fast", "peft"]
HEADS = ["linear", "native-lora"]
CPU = torch.device("cpu")


@pytest.fixture(params=["bert", "roberta"])
def model(request):
    """(model folder, model_type)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir"), request.param


def _lora(head: str) -> LoraSettings:
    return LoraSettings(rank=4, alpha=16, dropout=0.1, targets=["query", "value", "ffn-out"], layers=[1],
                        head=head)


@functools.lru_cache(maxsize=None)
def _config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


@functools.lru_cache(maxsize=None)
def _tokenizer(model_dir):
    return load_tokenizer(str(model_dir))


def _build(model_dir, backend: str, lora: LoraSettings, seed: int = 0):
    return build_model(model_dir, backend, lora, seed)


def _identity_keys(head: str) -> tuple[str, str]:
    """Where the RoBERTa linear / native-lora adapters keep the frozen identity classifier.dense (PEFT's names)."""
    base = "base_model.model.classifier.dense" + (".base_layer" if head == "native-lora" else "")
    return f"{base}.weight", f"{base}.bias"


def _randomize(m, seed=1):
    """Every trainable tensor random (non-zero B, a head with visible logits); frozen tensors untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(m, model_dir):
    with torch.no_grad():
        return m.eval()(m.collate(_tokenizer(model_dir)(TEXTS)["input_ids"]))


def _hf_inputs(model_dir):
    return _tokenizer(model_dir)(TEXTS, padding=True, return_tensors="pt")


def _plain_model(model_dir):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4)
    finally:
        hf_logging.set_verbosity(verbosity)


def _all_tensors(m) -> dict[str, torch.Tensor]:
    """Parameters and buffers (non-persistent ones included: the fast backend keeps its frozen weights there)."""
    out = {f"p:{n}": p.detach().clone() for n, p in m.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in m.named_buffers()})
    return out


# -- counts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", HEADS)
def test_trainable_counts_equal_plan_in_both_backends(model, head):
    model_dir, model_type = model
    lora = _lora(head)
    plan = count(_config(model_dir), 4, lora)
    built = {b: _build(model_dir, b, lora) for b in BACKENDS}
    names = {b: [n for n, _ in m.trainable_named_parameters()] for b, m in built.items()}
    for b, m in built.items():
        assert sum(p.numel() for _, p in m.trainable_named_parameters()) == plan.trainable, b
        assert all(p.requires_grad for _, p in m.trainable_named_parameters())
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == plan.trainable, b
    assert names["fast"] == names["peft"]  # PEFT's names, in PEFT's order
    assert built["fast"].count_parameters() == built["peft"].count_parameters()
    head_names = [n for n in names["fast"] if ".encoder." not in n]
    pre = "base_model.model."
    expected = {
        ("bert", "linear"): [f"{pre}classifier.weight", f"{pre}classifier.bias"],
        ("bert", "native-lora"): [f"{pre}bert.pooler.dense.lora_A.weight", f"{pre}bert.pooler.dense.lora_B.weight",
                                  f"{pre}classifier.weight", f"{pre}classifier.bias"],
        ("roberta", "linear"): [f"{pre}classifier.out_proj.weight", f"{pre}classifier.out_proj.bias"],
        ("roberta", "native-lora"): [f"{pre}classifier.dense.lora_A.weight", f"{pre}classifier.dense.lora_B.weight",
                                     f"{pre}classifier.out_proj.weight", f"{pre}classifier.out_proj.bias"],
    }[model_type, head]
    assert head_names == expected


def test_bert_linear_is_native(tiny_bert_dir):
    lin, nat = (_build(tiny_bert_dir, "fast", _lora(h)) for h in ("linear", "native"))
    assert lin.adapter_state_dict().keys() == nat.adapter_state_dict().keys()
    nat.load_adapter_state_dict(lin.adapter_state_dict())
    torch.testing.assert_close(_logits(lin, tiny_bert_dir), _logits(nat, tiny_bert_dir), atol=0, rtol=0)
    assert peft_format.adapter_config(_lora("linear"), lin.layout, base_model="x") == \
        peft_format.adapter_config(_lora("native"), nat.layout, base_model="x")


# -- the two backends compute the same function --------------------------------------------------------------------
@pytest.mark.parametrize("head", HEADS)
def test_fast_and_peft_agree(model, head):
    model_dir, _ = model
    lora = _lora(head)
    peft_m = _build(model_dir, "peft", lora)
    _randomize(peft_m)
    fast_m = _build(model_dir, "fast", lora, seed=7)
    state = peft_m.adapter_state_dict()
    assert {k: v.shape for k, v in fast_m.adapter_state_dict().items()} == {k: v.shape for k, v in state.items()}
    fast_m.load_adapter_state_dict(state)
    torch.testing.assert_close(_logits(fast_m, model_dir), _logits(peft_m, model_dir), atol=1e-5, rtol=1e-4)
    # and back: the fast model's adapter read by the PEFT backend
    _randomize(fast_m, seed=2)
    peft_m.load_adapter_state_dict(fast_m.adapter_state_dict())
    torch.testing.assert_close(_logits(peft_m, model_dir), _logits(fast_m, model_dir), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_roberta_dense_is_the_identity(tiny_roberta_dir, backend):
    """linear: logits = out_proj(tanh(h0)); the frozen identity is saved with the adapter, never trained."""
    for head in HEADS:
        m = _build(tiny_roberta_dir, backend, _lora(head))
        state = m.adapter_state_dict()
        w_key, b_key = _identity_keys(head)
        assert torch.equal(state[w_key], torch.eye(32)) and torch.equal(state[b_key], torch.zeros(32))
        assert w_key not in dict(m.trainable_named_parameters())
        assert set(state) - {n for n, _ in m.trainable_named_parameters()} == {w_key, b_key}


# -- PEFT reads the adapter file ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS)
def test_peft_loads_the_saved_adapter_with_the_same_logits(model, head, backend, tmp_path):
    """Every variant is PEFT-loadable with identical logits, and merge_and_unload (what `loracls export` does)
    keeps them."""
    from peft import PeftModel

    model_dir, model_type = model
    lora = _lora(head)
    m = _build(model_dir, backend, lora)
    _randomize(m)
    assert m.model_type == model_type
    save_adapter(m, lora, tmp_path, model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(_plain_model(model_dir), str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    # exactly the requested modules were adapted
    adapted = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                     for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    prefix = "bert" if model_type == "bert" else "roberta"
    want = [f"{prefix}.encoder.layer.1.{p}" for p in ("attention.self.query", "attention.self.value", "output.dense")]
    if head == "native-lora":
        want.append("bert.pooler.dense" if model_type == "bert" else "classifier.dense")
    assert adapted == sorted(want)
    expected = _logits(m, model_dir)
    with torch.no_grad():
        torch.testing.assert_close(pm(**_hf_inputs(model_dir)).logits, expected, atol=1e-5, rtol=1e-4)
        merged = pm.merge_and_unload().eval()
        assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**_hf_inputs(model_dir)).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta"])
def test_adapter_config_per_variant(model_type):
    """The adapter_config.json fields of each head, literally (the regexes as PEFT full-matches them)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2)
    prefix = "bert" if model_type == "bert" else "roberta"
    paths = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    linears = [f"{prefix}.encoder.layer.{i}.{p}" for i in range(2) for p in paths]
    linears += ["bert.pooler.dense", "classifier"] if model_type == "bert" else ["classifier.dense",
                                                                                 "classifier.out_proj"]
    enc = r".*\.encoder\.layer\.(?:1)\.(?:attention\.self\.query|attention\.self\.value|output\.dense)"
    for head in ("native", "linear"):
        c = peft_format.adapter_config(_lora(head), placement.layout(_lora(head), cfg, linears, ["classifier"]),
                                       base_model="x")
        assert (c["task_type"], c["modules_to_save"], c["target_modules"]) == ("SEQ_CLS", ["classifier"], enc)
    c = peft_format.adapter_config(_lora("native-lora"), placement.layout(_lora("native-lora"), cfg, linears,
                                                                          ["classifier"]), base_model="x")
    hits = [n for n in linears if re.fullmatch(c["target_modules"], n)]
    if model_type == "bert":
        assert (c["task_type"], c["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
        assert hits == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
                        "bert.encoder.layer.1.output.dense", "bert.pooler.dense"]
    else:
        assert (c["task_type"], c["modules_to_save"]) == (None, ["classifier.out_proj"])
        assert hits == ["roberta.encoder.layer.1.attention.self.query", "roberta.encoder.layer.1.attention.self.value",
                        "roberta.encoder.layer.1.output.dense", "classifier.dense"]


def test_what_peft_cannot_express(tiny_roberta_dir, tmp_path):
    """Documents PEFT 0.21's limits that shape the RoBERTa formats.

    1. task_type="SEQ_CLS" puts the whole `classifier` in modules_to_save, and PEFT then silently skips a LoRA
       target inside it: LoRA on classifier.dense needs task_type=None (a plain PeftModel, same logits).
    2. RoBERTa native-lora: the frozen identity base of classifier.dense is no adapter tensor to PEFT; it loads only
       because PEFT passes unknown checkpoint keys through to load_state_dict(strict=False).  Without those keys
       PEFT keeps transformers' random init for that dense, and the logits differ.
    3. RoBERTa linear: the identity dense travels through modules_to_save=["classifier"], so PEFT (loaded with
       is_trainable=True) counts and trains dense too; loracls trains only out_proj.  Logits are identical."""
    from peft import LoraConfig, PeftModel, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq_cls = get_peft_model(_plain_model(tiny_roberta_dir), LoraConfig(
            task_type="SEQ_CLS", r=4, target_modules=r"(?:.*\.layer\.1\.attention\.self\.query)|classifier\.dense",
            modules_to_save=["classifier.out_proj"]))
    adapted = [n for n, _ in seq_cls.named_modules() if n.endswith(".lora_A")]
    assert adapted == ["base_model.model.roberta.encoder.layer.1.attention.self.query.lora_A"]  # 1: dense skipped

    lora = _lora("native-lora")
    m = _build(tiny_roberta_dir, "fast", lora)
    _randomize(m)
    state = m.adapter_state_dict()
    expected = _logits(m, tiny_roberta_dir)
    config = peft_format.adapter_config(lora, m.layout, base_model="x")
    w_key, b_key = _identity_keys("native-lora")
    peft_format.write_adapter(tmp_path / "without", config, {k: v for k, v in state.items() if k not in (w_key, b_key)})
    pm = PeftModel.from_pretrained(_plain_model(tiny_roberta_dir), str(tmp_path / "without")).eval()
    with torch.no_grad():
        assert not torch.allclose(pm(**_hf_inputs(tiny_roberta_dir)).logits, expected, atol=1e-3)  # 2

    lora = _lora("linear")
    m = _build(tiny_roberta_dir, "fast", lora)
    save_adapter(m, lora, tmp_path / "linear")
    pm = PeftModel.from_pretrained(_plain_model(tiny_roberta_dir), str(tmp_path / "linear"), is_trainable=True)
    peft_trainable, _ = pm.get_nb_trainable_parameters()
    ours = count(_config(tiny_roberta_dir), 4, lora).trainable
    assert peft_trainable == ours + 32 * 32 + 32  # 3: PEFT also counts the frozen identity dense


# -- save / load, merge, training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS)
def test_save_and_reload_round_trip(model, head, backend, tmp_path):
    model_dir, model_type = model
    lora = _lora(head)
    m = _build(model_dir, backend, lora)
    _randomize(m)
    save_adapter(m, lora, tmp_path)
    other = _build(model_dir, backend, lora, seed=123)
    other.load_adapter_state_dict(peft_format.read_adapter(tmp_path)[1])
    a, b = m.adapter_state_dict(), other.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(m, model_dir), _logits(other, model_dir))
    assert all(p.requires_grad for _, p in other.trainable_named_parameters())
    assert sum(p.numel() for p in other.parameters() if p.requires_grad) == count(_config(model_dir), 4, lora).trainable
    missing = next(k for k in a if "lora_" not in k and ".encoder." not in k)
    with pytest.raises(Exception, match="lacks"):
        other.load_adapter_state_dict({k: v for k, v in a.items() if k != missing})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS)
def test_merge_keeps_logits(model, head, backend):
    model_dir, _ = model
    m = _build(model_dir, backend, _lora(head))
    _randomize(m)
    before = _logits(m, model_dir)
    m.merge()
    torch.testing.assert_close(_logits(m, model_dir), before, atol=1e-5, rtol=1e-4)
    assert not any("lora_" in n for n, _ in m.trainable_named_parameters())  # merged away, in both backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS)
def test_one_step_changes_only_trainable_tensors(model, head, backend):
    model_dir, model_type = model
    lora = _lora(head)
    m = _build(model_dir, backend, lora).train()
    trainable = dict(m.trainable_named_parameters())
    ids = {id(p) for p in trainable.values()}
    trainable_module_names = {f"p:{n}" for n, p in m.named_parameters() if id(p) in ids}
    before, adapter_before = _all_tensors(m), {k: v.detach().clone() for k, v in trainable.items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    batch = m.collate(_tokenizer(model_dir)(TEXTS)["input_ids"])
    torch.nn.functional.cross_entropy(m(batch), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    after = _all_tensors(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable_module_names, changed ^ trainable_module_names
    assert all(not torch.equal(adapter_before[k], v.detach()) for k, v in trainable.items())
    identity = _identity_keys(head) if model_type == "roberta" else None
    if identity is not None:  # still the identity
        state = m.adapter_state_dict()
        assert torch.equal(state[identity[0]], torch.eye(32)) and torch.equal(state[identity[1]], torch.zeros(32))
