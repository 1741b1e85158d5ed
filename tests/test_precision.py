"""`--precision auto|fp32|bf16`: what auto picks on which machine, and that each backend runs what it says.

The bf16 execution policy's logits, loss and gradients against transformers + PEFT are in test_fast_backend.py
(every policy is a parameter there), and its exact resume in test_resume.py."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import train_args
from loracls.backends import precision
from loracls.cli import main

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend this CPU has the given /proc/cpuinfo flags (the suite's LORACLS_CPU_BF16=0 lifted)."""
    monkeypatch.delenv("LORACLS_CPU_BF16", raising=False)

    def set_flags(*flags):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    return set_flags


@pytest.mark.parametrize("flags,expected", [(("avx2", "fma"), "fp32"), (("avx2", "avx512f", "avx512_vnni"), "fp32"),
                                            (("avx512f", "avx512_bf16"), "bf16"), (("amx_tile", "amx_bf16"), "bf16")])
def test_auto_picks_bf16_only_on_cpus_with_bf16_units(cpu_flags, flags, expected):
    cpu_flags(*flags)
    assert precision.resolve("auto", CPU)[0] == expected
    assert precision.resolve("auto", CPU, reference=True)[0] == "fp32"  # peft stays the fp32 reference
    assert precision.resolve("fp32", CPU)[0] == "fp32" and precision.resolve("bf16", CPU)[0] == "bf16"
    assert precision.resolve("auto", CUDA)[0] == "bf16"


def test_the_environment_overrides_what_the_flags_say(cpu_flags, monkeypatch):
    cpu_flags("avx512_bf16")
    monkeypatch.setenv("LORACLS_CPU_BF16", "0")
    assert precision.resolve("auto", CPU) == ("fp32", "auto: this CPU has no bf16 matrix units")
    cpu_flags("avx2")
    monkeypatch.setenv("LORACLS_CPU_BF16", "1")
    assert precision.resolve("auto", CPU)[0] == "bf16"


def _train(model_dir, data_dir, out, *extra):
    return main(train_args(model_dir, data_dir / "train.csv", out, "--epochs", "1", "--batch-size", "8", "--max-length",
                           "32", "--max-train-samples", "48", "--device", "cpu", *extra))


def test_auto_is_recorded_and_bf16_runs_end_to_end(tiny_bert_dir, small_agnews, tmp_path, cpu_flags, capsys):
    """Through the CLI: auto on a CPU without bf16 units trains in fp32, on one with them in bf16; the header says
    which and why, run.json and metrics.json record it, and predict reads the run in the precision asked."""
    cpu_flags("avx2")
    assert _train(tiny_bert_dir, small_agnews, tmp_path / "a", "--backend", "fast") == 0
    assert "precision fp32 (auto: this CPU has no bf16 matrix units)" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "run.json").read_text())["precision"] == "fp32"
    cpu_flags("avx512_bf16")
    assert _train(tiny_bert_dir, small_agnews, tmp_path / "b", "--backend", "fast") == 0
    assert "precision bf16 (auto: this CPU has AVX-512 BF16)" in capsys.readouterr().err
    run = tmp_path / "b"
    assert json.loads((run / "run.json").read_text())["precision"] == "bf16"
    assert json.loads((run / "metrics.json").read_text())["run"]["precision"] == "bf16"
    probs = {}
    for p in ("fp32", "bf16"):
        out = tmp_path / f"{p}.jsonl"
        assert main(["predict", str(run), "--input", str(small_agnews / "test.csv"), "--output", str(out),
                     "--precision", p, "--device", "cpu"]) == 0
        probs[p] = torch.tensor([list(json.loads(x)["probs"].values()) for x in out.read_text().splitlines()])
    diff = (probs["fp32"] - probs["bf16"]).abs().max().item()
    assert 0 < diff < 0.05  # bf16 really ran, and stayed within its precision


def test_peft_under_bf16_is_torch_autocast(tiny_bert_dir):
    """The peft backend's bf16 is what a transformers Trainer user gets with bf16=True: the same PEFT model run
    under torch.autocast(cpu, bfloat16)."""
    from helpers import build_model
    from transformers import AutoTokenizer

    from loracls.config import LoraSettings

    fp32 = build_model(tiny_bert_dir, "peft", LoraSettings(rank=4, alpha=8, dropout=0.0)).eval()
    bf16 = build_model(tiny_bert_dir, "peft", LoraSettings(rank=4, alpha=8, dropout=0.0)).eval()
    bf16.precision = "bf16"
    enc = AutoTokenizer.from_pretrained(str(tiny_bert_dir))(["a short text", "and a somewhat longer second one"],
                                                           padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = fp32.model(**batch).logits.float()
        plain, ours = fp32(batch), bf16(batch)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, plain) and (ours - plain).abs().max().item() < 0.08
