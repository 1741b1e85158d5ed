"""Invariants every backend must keep, checked against transformers and PEFT themselves."""

import pytest
import torch

from helpers import build_model, save_adapter
from loracls import peft_format
from loracls.config import LoraSettings
from loracls.models import load_tokenizer

TEXTS = ["Stocks rallied on Wall Street after the Fed kept rates unchanged.",
         "The Yankees beat the Red Sox 5-3.",
         "A new chip from Intel doubles the speed of laptops while using less power, the company said on Monday.",
         "Oil"]
BACKENDS = ["peft", "fast"]


_build = build_model


def _batch(model, model_dir):
    ids = load_tokenizer(str(model_dir))(TEXTS)["input_ids"]
    return model.collate(ids)


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.trainable_named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _plain_hf(model_dir, head_state):
    """transformers' own model with the given head weights and no LoRA."""
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4).eval()
    head = {k.removeprefix("base_model.model."): v for k, v in head_state.items() if "lora_" not in k}
    missing = set(head) - set(m.state_dict())
    assert not missing, missing
    m.load_state_dict(head, strict=False)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_b_zero_equals_base_model(tiny_model_dir, backend):
    model = _build(tiny_model_dir, backend).eval()
    batch = _batch(model, tiny_model_dir)
    ref = _plain_hf(tiny_model_dir, model.adapter_state_dict())
    ids = load_tokenizer(str(tiny_model_dir))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**ids).logits
        got = model(batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_changes_only_trainable_parameters(tiny_model_dir, backend):
    model = _build(tiny_model_dir, backend)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = dict(model.trainable_named_parameters())
    trainable_ids = {id(p) for p in trainable.values()}
    module_names_trainable = {k for k, v in model.named_parameters() if id(v) in trainable_ids}
    adapter_before = {k: v.detach().clone() for k, v in trainable.items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(_batch(model, tiny_model_dir)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= module_names_trainable, changed - module_names_trainable
    # every trainable tensor moved: each A, each B and the head
    unchanged = [k for k, v in trainable.items() if torch.equal(adapter_before[k], v.detach())]
    assert not unchanged, unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_reload_gives_identical_logits(tiny_model_dir, backend, tmp_path):
    lora = LoraSettings(rank=4, alpha=16, targets=["query", "value", "ffn-out"])
    model = _build(tiny_model_dir, backend, lora).eval()
    _randomize_b(model)
    save_adapter(model, lora, tmp_path)
    other = _build(tiny_model_dir, backend, lora, seed=123).eval()
    other.load_adapter_state_dict(peft_format.read_adapter(tmp_path)[1])
    batch = _batch(model, tiny_model_dir)
    with torch.no_grad():
        assert torch.equal(model(batch), other(batch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_loads_our_adapter_with_the_same_logits(tiny_model_dir, backend, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    lora = LoraSettings(rank=4, alpha=16, targets=["query", "key", "value", "ffn-out"], layers=[1])
    model = _build(tiny_model_dir, backend, lora).eval()
    _randomize_b(model)
    save_adapter(model, lora, tmp_path, tiny_model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=4)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    # exactly the requested modules were adapted: FFN output of layer 1, not attention.output.dense
    adapted = {n for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert len(adapted) == 4 and all(".layer.1." in n for n in adapted)
    assert not any("attention.output" in n for n in adapted)
    ids = load_tokenizer(str(tiny_model_dir))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(_batch(model, tiny_model_dir)), peft_model(**ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_and_unmerged_logits_agree(tiny_model_dir, backend):
    model = _build(tiny_model_dir, backend).eval()
    _randomize_b(model)
    batch = _batch(model, tiny_model_dir)
    with torch.no_grad():
        before = model(batch)
        model.merge()
        after = model(batch)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)


def test_adapters_cross_load_between_backends(tiny_model_dir):
    lora = LoraSettings(rank=4, alpha=16, targets=["query", "key", "value", "ffn-in"])
    peft_model = _build(tiny_model_dir, "peft", lora).eval()
    _randomize_b(peft_model)
    fast = _build(tiny_model_dir, "fast", lora, seed=9).eval()
    fast.load_adapter_state_dict(peft_model.adapter_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(_batch(fast, tiny_model_dir)), peft_model(_batch(peft_model, tiny_model_dir)),
                                   atol=1e-5, rtol=1e-4)
    assert fast.adapter_state_dict().keys() == peft_model.adapter_state_dict().keys()


def test_trainable_counts_match_peft(tiny_model_dir):
    counts = [_build(tiny_model_dir, b).count_parameters() for b in BACKENDS]
    assert counts[0] == counts[1]


# -- the names the training loop relies on -------------------------------------------------------------------------
@pytest.mark.parametrize("backend, lora", [
    ("peft", {"head": "native"}), ("peft", {"head": "linear"}), ("peft", {"head": "native-lora"}),
    ("peft", {"method": "dora"}), ("fast", {"head": "native"}), ("fast", {"head": "linear"}),
    ("fast", {"head": "native-lora"}),
])
def test_lora_in_a_name_marks_every_tensor_but_the_heads(tiny_bert_dir, backend, lora):
    """make_optimizer groups by name: 'lora_' for LoRA (and DoRA's magnitudes), everything else is the head."""
    model = build_model(tiny_bert_dir, backend, LoraSettings(rank=2, **lora))
    names = [n for n, _ in model.trainable_named_parameters()]
    assert any("lora_B" in n for n in names)
    assert all("lora_" in n or ".classifier." in n for n in names), names
