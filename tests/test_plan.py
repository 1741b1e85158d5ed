"""loracls.planning: counts from the config alone must match PEFT's count on the real model, exactly."""

from __future__ import annotations

import shutil
import warnings

import pytest

import re

from loracls.config import LoraSettings
from loracls.errors import LoraclsError
from loracls.families import TARGET_SETS
from loracls.models import read_model_config
from loracls.planning import Plan, check_budget, count, enumerate_plans, format_plan, format_plans, largest_rank
from loracls.planning import _peft_count


def count_on_meta(cfg, num_labels, lora):
    """The general path (PEFT on the meta device), bypassing the BERT-family closed form."""
    layers = cfg.num_hidden_layers if lora.layers is None else len(lora.layers)
    return _peft_count(cfg, num_labels, lora, layers)


# -- the two reference numbers ----------------------------------------------------------------------------------
def test_roberta_base_reference(roberta_base_dir):
    cfg = read_model_config(str(roberta_base_dir))
    plan = count(cfg, 4, LoraSettings(rank=6, targets=["query", "key", "value"], head="native"))
    assert plan.trainable == 925_444
    assert plan.lora_by_target == {"query": 110_592, "key": 110_592, "value": 110_592}
    assert plan.head == 768 * 768 + 768 + 768 * 4 + 4
    assert plan.base_total == 124_648_708  # RobertaForSequenceClassification(roberta-base, num_labels=4)
    assert plan.percent == pytest.approx(100 * 925_444 / 124_648_708)
    assert plan.breakdown == {"query": 110_592, "key": 110_592, "value": 110_592, "head": 593_668}


def test_minilm_reference(minilm_dir):
    cfg = read_model_config(str(minilm_dir))
    plan = count(cfg, 4, LoraSettings(rank=6, targets=["query", "key", "value"]))
    assert plan.trainable == 84_484


def test_config_only_folder(tmp_path, roberta_base_dir):
    shutil.copy(roberta_base_dir / "config.json", tmp_path / "config.json")
    cfg = read_model_config(str(tmp_path))
    assert count(cfg, 4, LoraSettings(rank=6)).trainable == 925_444


# -- agreement with PEFT on real (tiny) models ------------------------------------------------------------------
def _peft_counts(model_dir, lora: LoraSettings, model_type: str) -> tuple[int, int]:
    """(PEFT trainable, plain model total) for `lora` on the model in model_dir with 4 labels.

    PeftModelForSequenceClassification (task_type="SEQ_CLS") always adds the whole `classifier` to
    modules_to_save, so the RoBERTa heads that train only part of the classifier (linear, native-lora) are
    built with a plain PeftModel (task_type=None) instead.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4)
    total = sum(p.numel() for p in model.parameters())
    layers = r"\d+" if lora.layers is None else "(?:" + "|".join(map(str, lora.layers)) + ")"
    regex = rf".*\.layer\.{layers}\.(?:{'|'.join(re.escape(PATHS[t]) for t in lora.targets)})"
    task_type = "SEQ_CLS"
    if model_type == "bert":
        save = ["classifier"]
        if lora.head == "native-lora":
            regex = rf"(?:{regex})|bert\.pooler\.dense"
    elif lora.head == "native":
        save = ["classifier"]
    elif lora.head == "linear":
        save, task_type = ["classifier.out_proj"], None
    else:
        save, task_type = ["classifier.out_proj"], None
        regex = rf"(?:{regex})|classifier\.dense"
    config = LoraConfig(task_type=task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                        target_modules=regex, modules_to_save=save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return trainable, total


# The BERT-family module paths, written out here for the reference PEFT model.
PATHS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
         "attention-output": "attention.output.dense", "ffn-in": "intermediate.dense", "ffn-out": "output.dense"}
_SETTINGS = (
    [dict(rank=3, targets=[t]) for t in PATHS]
    + [dict(rank=2, targets=list(PATHS)),
       dict(rank=4, targets=["query", "value", "ffn-out"], layers=[1]),
       dict(rank=5, targets=["key", "ffn-in"], head="linear"),
       dict(rank=4, targets=["query", "value"], head="native-lora"),
       dict(rank=2, targets=list(PATHS), layers=[0], head="native-lora")]
)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_matches_peft(model_type, request):
    model_dir = request.getfixturevalue(f"tiny_{model_type}_dir")
    cfg = read_model_config(str(model_dir))
    for kw in _SETTINGS:
        lora = LoraSettings(alpha=8, **kw)
        plan = count(cfg, 4, lora)
        assert plan.trainable == count_on_meta(cfg, 4, lora).trainable, (model_type, kw)
        trainable, total = _peft_counts(model_dir, lora, model_type)
        assert plan.trainable == trainable, (model_type, kw)
        assert plan.base_total == total, (model_type, kw)
        assert plan.trainable == sum(plan.lora_by_target.values()) + plan.head


def test_linear_head_on_bert_is_native(tiny_bert_dir):
    cfg = read_model_config(str(tiny_bert_dir))
    native = count(cfg, 4, LoraSettings(head="native"))
    linear = count(cfg, 4, LoraSettings(head="linear"))
    assert native.trainable == linear.trainable


# -- errors -----------------------------------------------------------------------------------------------------
def test_layers_out_of_range(tiny_bert_dir):
    cfg = read_model_config(str(tiny_bert_dir))
    with pytest.raises(LoraclsError, match="out of range"):
        count(cfg, 4, LoraSettings(layers=[0, 2]))


def test_model_type_without_a_table_row():
    """RoFormer has no row in loracls.families: the portable names are inferred from its layers (more in
    test_inferred_targets.py), and module-name suffixes are counted as PEFT counts them."""
    from transformers import RoFormerConfig

    cfg = RoFormerConfig(vocab_size=100, hidden_size=16, embedding_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32)
    # query, key, value: 2 layers x 3 x 2*(16+16); the head as below
    assert count(cfg, 4, LoraSettings(rank=2)).trainable == 2 * 3 * 64 + (16 * 16 + 16) + (16 * 4 + 4)
    plan = count(cfg, 4, LoraSettings(rank=2, targets=["attention.self.query", "self.value", "dense"]))
    # LoRA: 2 layers x (query 2*(16+16), value 2*(16+16), and 'dense' is the end of three linears:
    # attention.output.dense 2*(16+16), intermediate.dense 2*(16+32), output.dense 2*(32+16));
    # head: RoFormerClassificationHead dense 16*16+16 and out_proj 16*4+4
    assert plan.trainable == 2 * (64 + 64 + 64 + 96 + 96) + (16 * 16 + 16) + (16 * 4 + 4)


def test_xlm_roberta_is_supported():
    from transformers import XLMRobertaConfig

    cfg = XLMRobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)
    plan = count(cfg, 3, LoraSettings(rank=2, targets=["query"]))
    assert plan.trainable == 2 * 32 + (16 * 16 + 16) + (16 * 3 + 3)


def test_bad_model_paths(tmp_path):
    for bad in (tmp_path / "missing", tmp_path):  # does not exist; exists without config.json
        with pytest.raises(LoraclsError) as e:
            read_model_config(str(bad))
        assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LoraclsError) as e:
        read_model_config(str(tmp_path))
    assert "\n" not in str(e.value)


# -- budgets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [700_000, 925_444, 2_000_000])
def test_largest_rank(roberta_base_dir, budget):
    cfg = read_model_config(str(roberta_base_dir))
    lora = LoraSettings(targets=["query", "key", "value"])
    r = largest_rank(cfg, 4, lora, budget)
    assert count(cfg, 4, LoraSettings(rank=r, targets=lora.targets)).trainable <= budget
    assert count(cfg, 4, LoraSettings(rank=r + 1, targets=lora.targets)).trainable > budget
    if budget == 925_444:
        assert r == 6


def test_largest_rank_too_small(roberta_base_dir):
    cfg = read_model_config(str(roberta_base_dir))
    with pytest.raises(LoraclsError, match="rank 1"):
        largest_rank(cfg, 4, LoraSettings(), 100_000)  # the native head alone is 593,668


def test_enumerate_plans(roberta_base_dir):
    cfg = read_model_config(str(roberta_base_dir))
    budget = 1_000_000
    plans = enumerate_plans(cfg, 4, budget)
    assert plans and all(isinstance(p, Plan) and p.trainable <= budget for p in plans)
    assert all(p.lora.layers is None for p in plans)
    keys = [(-p.trainable, len(p.lora.targets)) for p in plans]
    assert keys == sorted(keys)
    assert {p.lora.head for p in plans} == {"native", "linear", "native-lora"}
    # Everything from the candidate grid that fits is there.
    expected = sum(
        1 for ts in TARGET_SETS.values() for r in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
        for h in ("native", "linear", "native-lora")
        if count(cfg, 4, LoraSettings(rank=r, targets=list(ts), head=h)).trainable <= budget)
    assert len(plans) == expected
    assert enumerate_plans(cfg, 4, 10) == []
    text = format_plans(plans, limit=5)
    assert "more plans" in text and "925,444" in text
    assert "raise --max-trainable" in format_plans([])


def test_check_budget(roberta_base_dir):
    cfg = read_model_config(str(roberta_base_dir))
    plan = count(cfg, 4, LoraSettings(rank=6))
    check_budget(plan, None)
    check_budget(plan, 925_444)
    with pytest.raises(LoraclsError) as e:
        check_budget(plan, 925_443)
    msg = str(e.value)
    assert "\n" not in msg
    assert "925,444" in msg and "925,443" in msg and "--max-trainable" in msg and "loracls plan" in msg


def test_format_plan(roberta_base_dir):
    cfg = read_model_config(str(roberta_base_dir))
    text = format_plan(count(cfg, 4, LoraSettings(rank=6, layers=[0, 5])))
    for piece in ("query", "6*(768+768) x 2", "classifier.out_proj", "768*4+4", "total trainable",
                  "124,648,708", "%"):
        assert piece in text
