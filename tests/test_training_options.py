"""Training options: gradient accumulation, schedules, LoRA+, early stopping, label smoothing, --rank auto (from the
CLI and from Python)."""

import json

import pytest
import torch

import loracls
from helpers import train_args
from loracls.cli import main
from loracls.config import RunConfig
from loracls.training import lr_factor, make_optimizer


def _train(model_dir, data, out, *extra):
    assert main(train_args(model_dir, data, out, "--max-length", "32", "--dropout", "0", "--validation-fraction", "0",
                           *extra)) == 0
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_gradient_accumulation_equals_the_full_batch(no_dropout_bert_dir, small_agnews, tmp_path):
    data = small_agnews / "train.csv"
    full = _train(no_dropout_bert_dir, data, tmp_path / "full", "--batch-size", "16", "--backend", "peft",
                  "--max-train-samples", "64", "--epochs", "1", "--lr", "1e-3")
    accum = _train(no_dropout_bert_dir, data, tmp_path / "accum", "--batch-size", "8", "--grad-accum", "2",
                   "--backend", "peft", "--max-train-samples", "64", "--epochs", "1", "--lr", "1e-3")
    assert full.keys() == accum.keys()
    for k in full:
        torch.testing.assert_close(full[k], accum[k], atol=1e-5, rtol=1e-4)


def test_schedules():
    lin = lr_factor(100, 10, "linear")
    cos = lr_factor(100, 10, "cosine")
    const = lr_factor(100, 10, "constant")
    assert [lin(0), lin(5), lin(10), lin(55), lin(100)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert [cos(10), cos(55), cos(100)] == pytest.approx([1, 0.5, 0])
    assert [const(5), const(50), const(100)] == pytest.approx([0.5, 1, 1])


def test_lora_plus_gives_b_its_own_learning_rate(tiny_bert_dir):
    from helpers import build_model

    cfg = RunConfig(train={"lr": 1e-4, "lora_plus_ratio": 16})
    model = build_model(tiny_bert_dir, "peft", cfg.lora)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.trainable_named_parameters():
        assert lrs[id(p)] == pytest.approx(1.6e-3 if "lora_B" in name else 1e-4), name


def test_early_stopping_stops_when_validation_does_not_improve(tiny_bert_dir, small_agnews, tmp_path):
    out = tmp_path / "run"
    # lr so small that validation accuracy cannot improve after the first epoch
    assert main(train_args(tiny_bert_dir, small_agnews / "train.csv", out, "--max-length", "32", "--epochs", "6",
                           "--lr", "1e-12", "--early-stopping-patience", "2", "--max-train-samples", "80")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["epochs_run"] == 3 and m["run"]["best_epoch"] == 1


def test_label_smoothing_and_cosine_train(tiny_bert_dir, small_agnews, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, small_agnews / "train.csv", out, "--max-length", "32", "--epochs", "1",
                           "--label-smoothing", "0.1", "--schedule", "cosine", "--warmup-ratio", "0.2", "--rslora",
                           "--targets", "q,v,ffn_in,ffn_out", "--layers", "1", "--max-train-samples", "64")) == 0
    cfg = (out / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in cfg and "schedule: cosine" in cfg and "rslora: true" in cfg
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and "layer\\.(?:1)" in adapter["target_modules"]


def test_rank_auto_picks_the_largest_rank_under_the_budget(tiny_bert_dir, small_agnews, tmp_path, capsys):
    from loracls import planning
    from loracls.config import LoraSettings
    from loracls.models import read_model_config

    budget = 5000
    out = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, small_agnews / "train.csv", out, "--max-length", "32", "--epochs", "1",
                           "--rank", "auto", "--budget", budget, "--max-train-samples", "32")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["parameters"]["trainable"] <= budget
    cfg = read_model_config(str(tiny_bert_dir))
    rank = int([line for line in (out / "config.yaml").read_text().splitlines() if "rank:" in line][0].split()[-1])
    assert planning.count(cfg, 4, LoraSettings(rank=rank + 1)).trainable > budget


def test_api_train_rank_auto_fits_the_budget(tiny_bert_dir, small_agnews, tmp_path, capsys):
    from loracls import planning
    from loracls.config import LoraSettings
    from loracls.models import read_model_config

    with pytest.raises(loracls.LoraclsError, match="budget"):
        loracls.train(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"), rank="auto")
    budget = 5000
    result = loracls.train(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"), rank="auto",
                           budget=budget, output_dir=str(tmp_path / "run"), epochs=1, max_length=32,
                           max_train_samples=32, progress=False)
    assert result.metrics["parameters"]["trainable"] <= budget
    assert "max_trainable: 5000" in (result.run_dir / "config.yaml").read_text()  # the budget is enforced too
    rank = loracls.make_config(result.run_dir / "config.yaml").lora.rank
    cfg = read_model_config(str(tiny_bert_dir))
    assert planning.count(cfg, 4, LoraSettings(rank=rank + 1)).trainable > budget
    assert loracls.plan(str(tiny_bert_dir), rank="auto", budget=budget).lora.rank == rank
    assert f"rank auto picked r={rank}" in capsys.readouterr().err
