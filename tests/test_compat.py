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
