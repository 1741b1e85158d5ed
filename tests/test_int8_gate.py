"""int8 is written only where it predicts what fp32 predicts: checked on the run's own held-out texts, refused in
one line below INT8_MIN_AGREEMENT, and the agreement kept in the folder's manifest.  The agreement is checked
against plain onnxruntime reading the fp32 and int8 folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import onnx_logits, run_cli, tiny_train_args, train_args
from loracls.cli import main
from loracls.onnx_export import INT8_MIN_AGREEMENT

WORDS = {0: "markets stocks bank shares profit trade", 1: "team match goal season coach league"}


def write_data(path: Path, n: int, offset: int = 0) -> tuple[Path, list[str]]:
    texts = [f"{WORDS[i % 2]} {WORDS[i % 2].split()[(i // 2) % 6]} number {i + offset}" for i in range(n)]
    path.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    return path, texts


def train(model, folder: Path, *extra) -> Path:
    """A run trained on 64 rows of two classes that share no word."""
    train_csv, _ = write_data(folder / "train.csv", 64)
    run = folder / "run"
    assert main(train_args(model, train_csv, run, "--max-length", "16", "--device", "cpu", *extra)) == 0
    return run


@pytest.fixture(scope="module")
def confident(tmp_path_factory, tiny_bert_dir):
    """A run trained until its predictions are far from a tie: int8 cannot flip them."""
    folder = tmp_path_factory.mktemp("confident")
    val, texts = write_data(folder / "val.csv", 200, offset=1000)
    return train(tiny_bert_dir, folder, "--validation", val, "--epochs", "6", "--lr", "2e-2", "--batch-size", "8"), \
        texts


@pytest.fixture(scope="module")
def undecided(tmp_path_factory, minilm_dir):
    """A random BERT with wide weights (initializer range 1, not 0.02), barely trained on random words: its
    activations spread over a range that int8's one scale per tensor resolves coarsely (as MiniLM's outlier
    channels do), and its two logits stay close, so int8 flips some of its predictions."""
    import random

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("undecided")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=1.0)
    BertModel(cfg).save_pretrained(folder / "wide")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    tokenizer.save_pretrained(folder / "wide")
    words = [w for w in tokenizer.vocab if w.isalpha() and len(w) > 3][:5000]
    rng = random.Random(0)
    data = folder / "train.csv"
    data.write_text("text,label\n" + "".join(f"{' '.join(rng.choice(words) for _ in range(10))},{i % 2}\n"
                                              for i in range(400)))
    run = folder / "run"
    assert main(tiny_train_args(folder / "wide", data, run, "--lr", "1e-5", "--validation-fraction", "0.5")) == 0
    return run


def test_an_int8_that_strays_from_fp32_is_refused_and_nothing_is_left(undecided, tmp_path, capsys):
    out = tmp_path / "int8"
    code, err = run_cli(["export", undecided, "--output", out, "--format", "onnx", "--quantize", "int8"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "int8 agrees with fp32 on only" in err[0] and "texts (200 validation;" in err[0]
    assert f"threshold {INT8_MIN_AGREEMENT:.0%}" in err[0] and "--backend onnx" in err[0]
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    code, err = run_cli(["predict", undecided, "--input", undecided / ".." / "train.csv", "--output",
                         tmp_path / "p.jsonl", "--backend", "onnx-int8"], capsys)
    assert code == 2 and "int8 agrees with fp32 on only" in err[-1], err
    assert not (undecided / "onnx-int8").exists() and not (tmp_path / "p.jsonl").exists()
    assert not [p.name for p in undecided.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    # fp32, which the message offers, serves
    assert main(["predict", str(undecided), "--input", str(undecided / ".." / "train.csv"), "--output",
                 str(tmp_path / "p.jsonl"), "--backend", "onnx"]) == 0


def test_a_faithful_int8_is_written_with_its_agreement(confident, tmp_path):
    """The manifest's agreement is what plain onnxruntime finds between the fp32 and int8 folders on the run's
    validation texts."""
    run, texts = confident
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    assert main(["export", str(run), "--output", str(fp32), "--format", "onnx"]) == 0
    assert main(["export", str(run), "--output", str(int8), "--format", "onnx", "--quantize", "int8"]) == 0
    check = json.loads((int8 / "loracls_export.json").read_text())["int8_check"]
    assert check["texts"] == {"validation": 200}
    assert check["threshold"] == INT8_MIN_AGREEMENT and check["seconds"] >= 0
    a, _ = onnx_logits(fp32, texts)
    b, _ = onnx_logits(int8, texts)
    assert np.abs(a - b).max() > 0  # int8 indeed rounds
    assert check["agreement"] == pytest.approx((a.argmax(1) == b.argmax(1)).mean(), abs=1e-4)
    assert check["agreement"] >= INT8_MIN_AGREEMENT
    assert "model-fp32.onnx" not in {p.name for p in int8.iterdir()}
    assert "int8_check" not in json.loads((fp32 / "loracls_export.json").read_text())


def test_held_out_texts_that_cannot_be_read_are_not_replaced_by_training_texts(confident, tmp_path, capsys):
    """The validation file moved away: the texts the model learned would flatter int8, so nothing is certified.  A
    run that held nothing out is checked on its training texts, which are refused here as too few."""
    import shutil

    run, _ = confident
    copy = tmp_path / "copy"
    shutil.copytree(run.parent, copy)
    (copy / "val.csv").unlink()
    config = copy / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(run.parent), str(copy)))
    args = ["predict", copy / "run", "--input", copy / "train.csv", "--output", tmp_path / "p.jsonl", "--backend",
            "onnx-int8"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "held-out texts, and none can be read" in err[-1] and "val.csv" in err[-1], err
    assert not (copy / "run" / "onnx-int8").exists()
    config.write_text(config.read_text().replace(f"validation: {copy / 'val.csv'}", "validation: null")
                      .replace("validation_fraction: 0.1", "validation_fraction: 0.0"))
    code, err = run_cli(args, capsys)
    assert code == 2 and "it has only 64 (at least 200 are needed)" in err[-1], err
    assert not (copy / "run" / "onnx-int8").exists()
