"""Run directories written before the redesign still load and predict the same probabilities.

tests/fixtures/old-run-0fd6136 was written by loracls at commit 0fd6136 (before the architecture table, the typed
training state and the stored label mapping): a tiny BERT (the recipe of conftest.tiny_bert_dir, path relative
to where it was trained), LoRA rank 3 on q, v and the layer-1 attention output and FFN under their old names, and
`loracls predict` output on input.csv made by that version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loracls.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "old-run-0fd6136"


@pytest.fixture
def old_run(tmp_path, tiny_bert_dir, monkeypatch):
    shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert")  # where the old run's relative model path points
    shutil.copytree(FIXTURE, tmp_path / "old-run")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "old-run"


def _probs(path: Path) -> list[list[float]]:
    return [list(json.loads(line)["probs"].values()) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", ["fast", "peft"])
def test_old_run_predicts_the_same_probabilities(old_run, backend):
    assert "attention.output.dense" in (old_run / "config.yaml").read_text()  # the old target names
    assert not (old_run / "label_values.json").exists()
    out = old_run.parent / f"{backend}.jsonl"
    assert main(["predict", str(old_run), "--input", str(old_run / "input.csv"), "--output", str(out),
                 "--backend", backend]) == 0
    want, got = _probs(old_run / "old-predictions.jsonl"), _probs(out)
    assert len(got) == 4 and max(abs(a - b) for r, s in zip(want, got) for a, b in zip(r, s)) < 1e-6
    assert {r["label"] for r in map(json.loads, out.read_text().splitlines())} == {"neg", "pos"}


def test_old_run_evaluates_and_exports(old_run, capsys):
    data = old_run.parent / "eval.csv"
    data.write_text("text,label\na good great film,pos\nan awful poor plot,neg\n")
    assert main(["evaluate", str(old_run), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 2
    assert main(["export", str(old_run), "--output", str(old_run.parent / "export")]) == 0


# tests/fixtures/interrupted-run-dd22fe6 was written by loracls at commit dd22fe6, before the task object: a run of
# the tiny BERT on 64 AG News rows, stopped after its first epoch, whose checkpoint still calls the best validation
# score "best_accuracy" and the running training metric "correct".  Its config holds the absolute paths it was made
# under (OLD_ROOT); the test moves them to its own folder.
INTERRUPTED = Path(__file__).parent / "fixtures" / "interrupted-run-dd22fe6"
OLD_ROOT = "/tmp/loracls-oldckpt"


def test_checkpoint_from_before_tasks_resumes_like_an_uninterrupted_run(tmp_path, tiny_bert_dir):
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert")
    shutil.copytree(INTERRUPTED / "data", tmp_path / "data")
    run = tmp_path / "old-run"
    shutil.copytree(INTERRUPTED / "old-run", run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(OLD_ROOT, str(tmp_path)))
    position = torch.load(run / "checkpoint" / "state.pt", weights_only=True)["position"]
    assert "best_accuracy" in position and "correct" in position  # the names before the rename

    assert main(["train", "--resume", str(run)]) == 0
    fresh = tmp_path / "fresh"
    assert main(["train", "--config", str(config), "--output-dir", str(fresh)]) == 0

    resumed_m, fresh_m = (json.loads((r / "metrics.json").read_text()) for r in (run, fresh))
    assert resumed_m["test"]["accuracy"] == fresh_m["test"]["accuracy"]
    assert resumed_m["run"]["best_epoch"] == fresh_m["run"]["best_epoch"]
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (run, fresh))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    epochs = [[json.loads(x) for x in (r / "history.jsonl").read_text().splitlines()] for r in (run, fresh)]
    assert [e for e in epochs[0] if e["type"] == "epoch"] == [e for e in epochs[1] if e["type"] == "epoch"]
