"""More ways to spend the budget: DoRA, PiSSA, per-layer ranks and a classifier warm-up.  Counts against PEFT's
own, and every saved adapter read back by PEFT on the original base model with the trained model's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import peft_reference, peft_trainable_count, train_args
from loracls import training
from loracls.cli import main
from loracls.config import LoraSettings
from loracls.models import read_model_config
from loracls.planning import count

TEXTS = ["Stocks rallied after the bank kept rates.", "The team won the final.", "A new chip for phones.", "Oil"]
QKV = ["attention.self.query", "attention.self.key", "attention.self.value"]


def _peft_count(model_dir, **config) -> int:
    return peft_trainable_count(model_dir, QKV, **config)


@pytest.mark.parametrize("model", ["bert", "roberta"])
def test_counts_equal_peft(model, request):
    model_dir = request.getfixturevalue(f"tiny_{model}_dir")
    cfg = read_model_config(str(model_dir))
    assert count(cfg, 4, LoraSettings(rank=4, method="dora")).trainable == _peft_count(model_dir, r=4,
                                                                                       use_dora=True)
    assert count(cfg, 4, LoraSettings(rank=4, init="pissa")).trainable == _peft_count(model_dir, r=4)
    ranks = LoraSettings(rank=4, layer_ranks={1: 8})
    assert count(cfg, 4, ranks).trainable == _peft_count(model_dir, r=4, rank_pattern={r"encoder\.layer\.1\..*": 8})
    # and they differ from plain LoRA as they should: DoRA adds a magnitude per output feature of q, k and v
    plain = count(cfg, 4, LoraSettings(rank=4)).trainable
    assert count(cfg, 4, LoraSettings(rank=4, method="dora")).trainable == plain + 2 * 3 * 32
    assert count(cfg, 4, ranks).trainable == plain + 3 * 4 * (32 + 32)


def _train(model_dir, data, out, *extra):
    assert main(train_args(model_dir, data / "train.csv", out, "--epochs", "1", "--max-train-samples", "48",
                           "--max-length", "40", "--lr", "1e-2", "--rank", "4", *extra)) == 0
    return out


def _peft_logits(model_dir, adapter):
    """PEFT's probabilities for TEXTS with the saved adapter on the original base model (not merged)."""
    from transformers import AutoTokenizer

    pm = peft_reference(model_dir, adapter)
    enc = AutoTokenizer.from_pretrained(str(model_dir))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(pm(**enc).logits, -1).numpy()


@pytest.mark.parametrize("extra", [("--method", "dora"), ("--init", "pissa"), ("--layer-ranks", "0:2,1:8"),
                                   ("--init", "pissa", "--layer-ranks", "1:6"),
                                   ("--init", "pissa", "--head", "native-lora")],
                         ids=["dora", "pissa", "layer-ranks", "pissa-layer-ranks", "pissa-native-lora"])
def test_saved_adapter_reloads_in_peft_and_exports(tiny_roberta_dir, small_agnews, tmp_path, capsys, extra):
    """The run (peft backend: auto falls back, saying why) saves an adapter PEFT reads on the original weights with
    the same predictions, and the merged export predicts the same in pipeline()."""
    import numpy as np
    from transformers import pipeline

    import loracls

    run = _train(tiny_roberta_dir, small_agnews, tmp_path / "run", *extra)
    assert "backend auto -> peft (fast cannot:" in capsys.readouterr().err
    ours = loracls.load(run).predict_proba(TEXTS)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if "pissa" in extra:  # saved as the plain LoRA of twice the rank
        assert config["r"] == 8 and config["init_lora_weights"] is True and config["lora_alpha"] == 48.0
    assert config.get("use_dora", False) == ("dora" in extra)
    assert np.abs(_peft_logits(tiny_roberta_dir, run / "adapter") - ours).max() < 1e-5
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    clf = pipeline("text-classification", model=str(tmp_path / "export"), device="cpu", top_k=None)
    for row, probs in zip(clf(TEXTS), ours):
        got = {r["label"]: r["score"] for r in row}
        assert max(abs(got[name] - p) for name, p in zip(["World", "Sports", "Business", "Sci/Tech"], probs)) < 1e-4


def test_pissa_starts_at_the_base_model_and_trains(tiny_roberta_dir):
    """PiSSA moves the top singular part of each weight into A and B: A, B and the residual are PEFT's own
    init_lora_weights="pissa" on the same weights, at step 0 the model computes what the base computes, and a
    training step (an optimizer over every parameter) changes A and B while the residual stays frozen."""
    from helpers import build_model
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lora = LoraSettings(rank=4, alpha=8.0, init="pissa", dropout=0.0)
    pissa, plain = build_model(tiny_roberta_dir, "peft", lora), build_model(tiny_roberta_dir, "peft",
                                                                            LoraSettings(rank=4, dropout=0.0))
    # PEFT's own PiSSA of the same LoRA on the original weights: the same A, B and residual
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_roberta_dir), num_labels=4)
        ref = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8.0, lora_dropout=0.0,
                                              target_modules=QKV, init_lora_weights="pissa"))
    ref_lora = {k: v for k, v in get_peft_model_state_dict(ref).items() if "lora_" in k}
    ours = {k: v for k, v in pissa.adapter_state_dict().items() if "lora_" in k}
    assert ours.keys() == ref_lora.keys() and len(ours) == 2 * 3 * 2
    for k in ours:
        torch.testing.assert_close(ours[k], ref_lora[k], atol=1e-5, rtol=1e-4)
    residual = {n: p for n, p in pissa.model.named_parameters() if "base_layer" in n}
    ref_residual = dict(ref.named_parameters())
    assert len(residual) == 2 * 3 * 2  # weight and bias of q, k, v in 2 layers
    for n, p in residual.items():
        torch.testing.assert_close(p, ref_residual[n], atol=1e-5, rtol=1e-4)
    assert all(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k)  # unlike kaiming's zero B

    ids = AutoTokenizer.from_pretrained(str(tiny_roberta_dir))(TEXTS)["input_ids"]
    head = {k: v for k, v in plain.adapter_state_dict().items() if "lora_" not in k}
    pissa.load_adapter_state_dict({**pissa.adapter_state_dict(), **head})
    with torch.no_grad():
        torch.testing.assert_close(pissa.eval()(pissa.collate(ids)), plain.eval()(plain.collate(ids)),
                                   atol=1e-5, rtol=1e-4)

    before = {n: p.detach().clone() for n, p in pissa.model.named_parameters()}
    optimizer = torch.optim.AdamW(pissa.model.parameters(), lr=1e-2)  # every parameter: frozen must mean no grad
    torch.nn.functional.cross_entropy(pissa.train()(pissa.collate(ids)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    after = dict(pissa.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora_names = {n for n in before if "lora_" in n}
    assert lora_names and lora_names <= changed  # every A and B moved
    assert all("lora_" in n or "modules_to_save" in n for n in changed), sorted(changed)  # the residual did not
    assert all(torch.equal(before[n], after[n]) for n in residual)


def test_classifier_warmup_trains_the_head_first(tiny_bert_dir):
    from helpers import build_model

    from loracls.config import TrainSettings
    from loracls.training import make_schedule

    model = build_model(tiny_bert_dir, "peft", LoraSettings(rank=4))
    t = TrainSettings(epochs=1, batch_size=10, warmup_ratio=0.0, head_warmup_ratio=0.3, schedule="constant")
    schedule = make_schedule(model, t, torch.device("cpu"), 100)
    lrs = []
    for _ in range(schedule.total_steps):
        lrs.append([g["lr"] for g in schedule.optimizer.param_groups])
        schedule.optimizer.step()
        schedule.scheduler.step()
    assert schedule.total_steps == 10 and schedule.head_steps == 3
    assert [r[1] for r in lrs[:3]] == [0.0] * 3 and lrs[3][1] == t.lr
    assert all(r[0] == t.lr for r in lrs)  # the head trains from the first step


def test_a_classifier_warmup_keeps_lora_out_of_the_optimizer_until_it_ends(tiny_bert_dir, small_agnews, tmp_path,
                                                                          monkeypatch):
    """8 steps, half of them warm-up: through step 4 AdamW holds moments for the head's tensors alone (LoRA's
    gradients were dropped: the loop finds those tensors through the optimizer's groups), then for all."""
    real_save, moments = training.checkpoint.save, {}

    def save(path, state, **kwargs):
        held = {id(p) for p, s in kwargs["optimizer"].state.items() if s}
        groups = kwargs["optimizer"].param_groups
        moments[state.step] = [sum(id(p) in held for p in g["params"]) for g in groups]
        real_save(path, state, **kwargs)

    monkeypatch.setattr(training.checkpoint, "save", save)
    assert main(train_args(tiny_bert_dir, small_agnews / "train.csv", tmp_path / "r", "--epochs", "1", "--batch-size",
                           "8", "--max-train-samples", "64", "--max-length", "32", "--device", "cpu",
                           "--save-every-steps", "1", "--head-warmup-ratio", "0.5")) == 0
    head, a, b = moments[8]
    assert head > 0 and a > 0 and b > 0
    assert all(moments[step] == [head, 0, 0] for step in (1, 2, 3, 4)), moments


def test_methods_are_refused_by_the_fast_backend_with_a_reason(tiny_bert_dir, small_agnews, tmp_path, capsys):
    code = main(train_args(tiny_bert_dir, small_agnews / "train.csv", tmp_path / "r", "--backend", "fast", "--method",
                           "dora"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "implemented in the peft backend" in err[-1] and not (tmp_path / "r").exists()
    code = main(train_args(tiny_bert_dir, small_agnews / "train.csv", tmp_path / "r", "--method", "dora", "--init",
                           "pissa"))
    assert code == 2 and "--init pissa" in capsys.readouterr().err
