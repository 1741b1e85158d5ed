"""The CLI end to end on tiny random models: exact files written, predictions, export through pipeline()."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import loracls_command, train_args
from loracls.cli import main

RUN_FILES = {"run.json", "config.yaml", "labels.json", "label_values.json", "adapter/adapter_config.json",
             "adapter/adapter_model.safetensors", "history.jsonl", "metrics.json", "report.md",
             "confusion_matrix.png", "training_curves.png"}


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def run_args(model_dir, data_dir, out, *extra):
    """This file's run: two epochs on the folder's train.csv, tested on its test.csv."""
    return train_args(model_dir, data_dir / "train.csv", out, "--test", data_dir / "test.csv", "--epochs", "2",
                      "--batch-size", "16", "--max-length", "48", "--device", "cpu", "--log-every", "5", *extra)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_roberta_dir, small_agnews):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(run_args(tiny_roberta_dir, small_agnews, out, "--lr", "1e-3")) == 0
    return out


def test_train_writes_exactly_the_run_files(trained_run):
    assert files_in(trained_run) == RUN_FILES
    info = json.loads((trained_run / "run.json").read_text())
    assert info["status"] == "completed" and info["format_version"] == 1
    assert json.loads((trained_run / "labels.json").read_text()) == ["World", "Sports", "Business", "Sci/Tech"]
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["data"] == {**m["data"], "train_examples": 216, "validation_examples": 24, "test_examples": 120}
    assert m["test"]["num_examples"] == 120 and len(m["test"]["confusion_matrix"]) == 4
    assert set(m["test"]["per_class"]) == {"World", "Sports", "Business", "Sci/Tech"}
    assert m["parameters"]["trainable"] == sum(m["parameters"]["breakdown"].values())
    assert m["run"]["epochs_run"] == 2 and m["run"]["best_epoch"] in (1, 2)
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if h["type"] == "epoch"] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in history if h["type"] == "step")
    report = (trained_run / "report.md").read_text()
    assert "Sci/Tech" in report and "confusion_matrix.png" in report
    for png in ("confusion_matrix.png", "training_curves.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_prints_run_dir_and_headline(trained_run, tiny_roberta_dir, small_agnews, tmp_path, capsys):
    out = tmp_path / "r2"
    assert main(run_args(tiny_roberta_dir, small_agnews, out, "--epochs", "1", "--max-train-samples", "40")) == 0
    stdout = capsys.readouterr().out
    assert f"run directory: {out}" in stdout and "test: accuracy" in stdout


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "kaggle"])
def test_predict_formats(trained_run, small_agnews, tmp_path, fmt):
    out = tmp_path / f"pred.{fmt}"
    assert main(["predict", str(trained_run), "--input", str(small_agnews / "test.csv"), "--output", str(out),
                 "--format", fmt, "--device", "cpu"]) == 0
    lines = out.read_text().splitlines()
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    if fmt == "jsonl":
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 120 and [r["id"] for r in rows] == list(range(120))
        assert all(set(r) == {"id", "label", "label_id", "probs"} for r in rows)
        assert all(r["label"] == labels[r["label_id"]] and abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)
    elif fmt == "csv":
        rows = list(csv.DictReader(lines))
        assert len(rows) == 120 and list(rows[0]) == ["id", "label", "label_id"] + [f"prob_{n}" for n in labels]
    else:
        assert lines[0] == "ID,Label" and len(lines) == 121
        assert [line.split(",")[0] for line in lines[1:]] == [str(i) for i in range(120)]
        assert {line.split(",")[1] for line in lines[1:]} <= {"0", "1", "2", "3"}


def test_predict_is_the_same_on_both_backends(trained_run, small_agnews, tmp_path):
    outs = []
    for backend in ("fast", "peft"):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["predict", str(trained_run), "--input", str(small_agnews / "test.csv"), "--output", str(out),
                     "--backend", backend]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [r["label_id"] for r in outs[0]] == [r["label_id"] for r in outs[1]]
    p0 = np.array([list(r["probs"].values()) for r in outs[0]])
    p1 = np.array([list(r["probs"].values()) for r in outs[1]])
    assert np.abs(p0 - p1).max() < 1e-4


@pytest.mark.parametrize("backend", ["fast", "peft"])
def test_predict_batch_size_does_not_change_results(trained_run, small_agnews, tmp_path, backend, capsys):
    probs = []
    for bs in ("1", "7", "1000"):
        out = tmp_path / f"{backend}-{bs}.csv"
        assert main(["predict", str(trained_run), "--input", str(small_agnews / "test.csv"), "--output", str(out),
                     "--format", "csv", "--backend", backend, "--batch-size", bs]) == 0
        probs.append(np.array([[float(v) for v in row[3:]] for row in list(csv.reader(out.open()))[1:]]))
    assert all(np.abs(p - probs[0]).max() < 1e-5 for p in probs)
    for bad in ("0", "-3"):
        code = main(["predict", str(trained_run), "--input", str(small_agnews / "test.csv"), "--output",
                     str(tmp_path / "bad.csv"), "--batch-size", bad])
        err = capsys.readouterr().err
        assert code == 2 and "--batch-size: must be a positive whole number" in err and "Traceback" not in err
        assert not (tmp_path / "bad.csv").exists()


def test_evaluate_matches_the_run_metrics(trained_run, small_agnews, capsys):
    assert main(["evaluate", str(trained_run), "--data", str(small_agnews / "test.csv"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["confusion_matrix"] == want["confusion_matrix"]


def test_export_loads_in_pipeline_without_loracls(trained_run, small_agnews, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(trained_run), "--output", str(export)]) == 0
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    pred = tmp_path / "pred.jsonl"
    assert main(["predict", str(trained_run), "--input", str(small_agnews / "test.csv"), "--output", str(pred)]) == 0
    ours = [json.loads(line)["label"] for line in pred.read_text().splitlines()]
    # A fresh interpreter that cannot import loracls or peft.
    script = f"""
import sys, json, builtins
real_import = builtins.__import__
def guarded(name, *a, **k):
    if name.split('.')[0] in ('loracls', 'peft'):
        raise ImportError('blocked ' + name)
    return real_import(name, *a, **k)
builtins.__import__ = guarded
from transformers import AutoModelForSequenceClassification, pipeline
AutoModelForSequenceClassification.from_pretrained({str(export)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
import csv
texts = [r[1] + ' ' + r[2] for r in csv.reader(open({str(small_agnews / 'test.csv')!r}, newline=''))]
clf = pipeline('text-classification', model={str(export)!r}, device='cpu')
print(json.dumps([o['label'] for o in clf(texts, batch_size=32, truncation=True)]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert theirs == ours


def test_plan_prints_the_reference_count(roberta_base_dir, capsys):
    assert main(["plan", "--model", str(roberta_base_dir), "--num-labels", "4", "--rank", "6", "--alpha", "24",
                 "--targets", "query,key,value"]) == 0
    assert "925,444" in capsys.readouterr().out


def test_plan_minilm_count(minilm_dir, capsys):
    assert main(["plan", "--model", str(minilm_dir), "--num-labels", "4", "--rank", "6",
                 "--targets", "q,k,v"]) == 0
    assert "84,484" in capsys.readouterr().out


def test_plan_from_config(roberta_base_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {roberta_base_dir}\nlora: {{rank: 6, alpha: 24, targets: [query, key, value]}}\n")
    assert main(["plan", "--config", str(cfg), "--num-labels", "4"]) == 0
    assert "925,444" in capsys.readouterr().out


def test_every_help_explains_its_flags():
    for cmd in ([], ["train"], ["evaluate"], ["predict"], ["export"], ["plan"]):
        res = subprocess.run(loracls_command(*cmd, "--help"), capture_output=True, text=True)
        assert res.returncode == 0 and "usage: loracls" in res.stdout
    res = subprocess.run(loracls_command("train", "--help"), capture_output=True, text=True)
    for flag in ("--config", "--model", "--train", "--validation", "--test", "--text-columns", "--label-column",
                 "--output-dir", "--epochs", "--batch-size", "--lr", "--rank", "--alpha", "--dropout", "--targets",
                 "--max-length", "--max-train-samples", "--max-eval-samples", "--seed", "--device",
                 "--max-trainable", "--backend", "--resume", "--save-every-steps", "--overwrite", "--allow-pickle"):
        assert flag in res.stdout, flag


@pytest.mark.parametrize("head", ["linear", "native-lora"])
def test_head_variants_end_to_end(head, tiny_roberta_dir, small_agnews, tmp_path):
    """Train with a non-native head, then predict (both backends) and export: all agree."""
    from loracls import planning
    from loracls.config import LoraSettings
    from loracls.models import read_model_config

    run = tmp_path / "run"
    assert main(run_args(tiny_roberta_dir, small_agnews, run, "--epochs", "1", "--head", head,
                         "--max-train-samples", "64")) == 0
    m = json.loads((run / "metrics.json").read_text())
    want = planning.count(read_model_config(str(tiny_roberta_dir)), 4, LoraSettings(head=head)).trainable
    assert m["parameters"]["trainable"] == want
    preds = {}
    for backend in ("fast", "peft"):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["predict", str(run), "--input", str(small_agnews / "test.csv"), "--output", str(out),
                     "--backend", backend]) == 0
        preds[backend] = np.array([list(json.loads(x)["probs"].values()) for x in out.read_text().splitlines()])
    assert np.abs(preds["fast"] - preds["peft"]).max() < 1e-5
    export = tmp_path / "export"
    assert main(["export", str(run), "--output", str(export)]) == 0
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    texts = [r[1] + " " + r[2] for r in csv.reader(open(small_agnews / "test.csv", newline=""))][:16]
    with torch.no_grad():
        probs = torch.softmax(model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits, -1)
    assert np.abs(probs.numpy() - preds["fast"][:16]).max() < 1e-5
