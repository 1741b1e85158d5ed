"""The Python API against the CLI, ONNX export and serving against PyTorch and plain onnxruntime, TensorBoard logs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import loracls
from loracls.cli import main

TEXTS = ["Stocks rallied on Wall Street after the bank kept rates unchanged.", "The team won the final.",
         "A new chip doubles the speed of phones.", "Oil"]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, tiny_bert_dir, small_agnews):
    out = tmp_path_factory.mktemp("api") / "run"
    result = loracls.train(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"),
                           test=str(small_agnews / "test.csv"), output_dir=str(out), epochs=1, max_length=48,
                           lr=5e-3, progress=False, log_to="tensorboard")
    return result


def test_train_returns_the_run_and_its_metrics(api_run):
    assert api_run.run_dir.is_dir() and api_run.metrics == json.loads((api_run.run_dir / "metrics.json").read_text())
    assert api_run.metrics["test"]["num_examples"] == 120
    with pytest.raises(loracls.LoraclsError, match="did you mean 'max_length'"):
        loracls.train(model="x", max_lenght=5)


def test_predictor_matches_the_cli(api_run, small_agnews, tmp_path):
    clf = loracls.load(api_run.run_dir, backend="fast")
    assert clf.labels == ["World", "Sports", "Business", "Sci/Tech"]
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(api_run.run_dir), "--input", str(small_agnews / "test.csv"), "--output", str(out),
                 "--backend", "fast"]) == 0
    cli = [json.loads(line) for line in out.read_text().splitlines()]
    import csv

    texts = [" ".join(r[1:]) for r in csv.reader((small_agnews / "test.csv").open())]
    api = clf.predict(texts)
    assert [r["label"] for r in api] == [r["label"] for r in cli]
    assert max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(api, cli) for k in a["probs"]) < 1e-6
    probs = clf.predict_proba(texts[:5])
    assert probs.shape == (5, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    metrics = clf.evaluate(str(small_agnews / "test.csv"))
    assert metrics["accuracy"] == pytest.approx(api_run.metrics["test"]["accuracy"])
    by_names = clf.evaluate((texts[:3], ["World", "Sports", "Business"]))
    by_values = clf.evaluate(texts[:3], labels=["1", "2", "3"])  # AG News' own 1-based values
    assert by_names["confusion_matrix"] == by_values["confusion_matrix"]


def test_plan_api_counts(tiny_bert_dir):
    p = loracls.plan(str(tiny_bert_dir), num_labels=4, rank=4, targets="all-linear")
    assert p.total == p.trainable == sum(p.breakdown.values()) and "ffn-in" in p.breakdown


def test_tensorboard_events_parse(api_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(api_run.run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "validation/accuracy"} <= set(tags)
    history = [json.loads(line) for line in (api_run.run_dir / "history.jsonl").read_text().splitlines()]
    steps = [h for h in history if h["type"] == "step"]
    assert [e.step for e in acc.Scalars("train/loss")] == [h["step"] for h in steps]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(steps[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("model", ["bert", "roberta"])
def test_onnx_export_matches_pytorch_and_loads_in_plain_onnxruntime(model, request, small_agnews, tmp_path):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{model}_dir")
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--train", str(small_agnews / "train.csv"), "--output-dir",
                 str(run), "--epochs", "1", "--max-train-samples", "48", "--no-progress", "--max-length", "48",
                 "--lr", "5e-3"]) == 0
    out = tmp_path / "onnx"
    assert main(["export", str(run), "--output", str(out), "--format", "onnx"]) == 0
    assert {"model.onnx", "config.json", "tokenizer.json", "loracls_export.json"} <= {p.name for p in out.iterdir()}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["input_ids", "attention_mask", "token_type_ids"] if model == "bert"
                     else ["input_ids", "attention_mask"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    enc = AutoTokenizer.from_pretrained(str(out))(TEXTS, padding=True, return_tensors="np")
    logits = session.run(["logits"], {n: enc[n].astype(np.int64) for n in names})[0]
    torch_probs = loracls.load(run, backend="peft").predict_proba(TEXTS)
    e = np.exp(logits - logits.max(1, keepdims=True))
    assert np.abs(e / e.sum(1, keepdims=True) - torch_probs).max() < 1e-4
    # the raw logits too, against the merged transformers model
    import torch

    from loracls.exports import merged_transformers_model

    merged, tok = merged_transformers_model(run)
    with torch.no_grad():
        ref = merged(**tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tech"}


def test_onnx_serving_through_the_cli_needs_no_torch(api_run, small_agnews, tmp_path):
    """predict --backend onnx exports once into the run, then serves with onnxruntime + tokenizers alone: the
    same labels as PyTorch, and torch never imported."""
    ours = tmp_path / "torch.jsonl"
    assert main(["predict", str(api_run.run_dir), "--input", str(small_agnews / "test.csv"), "--output", str(ours),
                 "--backend", "peft"]) == 0
    code = ("import sys, json; from loracls.cli import main; "
            f"rc = main(['predict', {str(api_run.run_dir)!r}, '--input', {str(small_agnews / 'test.csv')!r}, "
            f"'--output', {str(tmp_path / 'onnx.jsonl')!r}, '--backend', 'onnx']); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in "
            "sys.modules}))")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (api_run.run_dir / "onnx" / "model.onnx").is_file(), first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    status = json.loads(second.stdout.strip().splitlines()[-1])
    assert status == {"rc": 0, "torch": False, "transformers": False}, second.stderr[-2000:]
    a = [json.loads(line) for line in ours.read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "onnx.jsonl").read_text().splitlines()]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(a, b) for k in x["probs"]) < 1e-4


def test_onnx_tokenization_equals_transformers(api_run):
    from loracls.models import load_tokenizer, tokenize
    from loracls.serve import OnnxPredictor

    onnx = OnnxPredictor(api_run.run_dir)
    tok = load_tokenizer(str(json.loads((api_run.run_dir / "run.json").read_text())["model"]))
    texts = TEXTS + ["word " * 3000, "x" * 9000 + " tail", ""]
    assert onnx.tokenize(texts) == tokenize(tok, texts, 48)


@pytest.mark.slow
def test_onnx_on_minilm_and_int8_agreement(minilm_dir, agnews_dir, tmp_path):
    """Real weights: fp32 ONNX logits equal PyTorch's within 1e-4; int8 agrees with fp32 on >= 99% of 1,000
    test texts."""
    import csv

    run = tmp_path / "run"
    head = tmp_path / "train.csv"
    head.write_text("".join((agnews_dir / "train.csv").read_text().splitlines(keepends=True)[:2000]))
    (tmp_path / "classes.txt").write_text((agnews_dir / "classes.txt").read_text())
    assert main(["train", "--model", str(minilm_dir), "--train", str(head), "--output-dir", str(run),
                 "--epochs", "1", "--no-progress", "--max-length", "64", "--lr", "1e-3", "--validation-fraction",
                 "0.05"]) == 0
    texts = [" ".join(r[1:]) for r in csv.reader((agnews_dir / "test.csv").open())][:1000]
    torch_p = loracls.load(run, backend="fast").predict_proba(texts[:200])
    fp32 = loracls.load(run, backend="onnx")
    int8 = loracls.load(run, backend="onnx-int8")
    p32 = fp32.predict_proba(texts)
    assert np.abs(p32[:200] - torch_p).max() < 1e-4
    p8 = int8.predict_proba(texts)
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.99
