"""The API and the sweep as the CLI's one source: evaluate() refuses ambiguous input and maps labels as files do,
rank="auto" works from Python, a failed or interrupted sweep trial is one line, and main() leaves the caller's
SIGALRM handler and timer as it found them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import loracls
from loracls import cli
from loracls.api import Predictor
from loracls.config import RunConfig
from loracls.data import Labels


# -- Predictor.evaluate on texts: a stand-in model, so only the label handling is under test -------------------------
class _AlwaysWorld:
    """A predictor whose every answer is class 0 (World), AG News' labels: values 1..4 as the data wrote them."""

    run_dir, backend = "run", "fast"
    label_map = Labels(["World", "Sports", "Business", "Sci/Tech"], ["1", "2", "3", "4"])
    config = RunConfig()  # the run's data settings: how its labels compare (data.label_case)

    def tokenize(self, texts):
        return [[0]] * len(texts), 0

    def predict_proba_ids(self, ids):
        return np.tile(np.array([0.7, 0.1, 0.1, 0.1], dtype=np.float32), (len(ids), 1))


@pytest.mark.parametrize("data, labels", [(["a", "b", "c"], None), (("a", "b"), None), (["a", "b"], None),
                                          (["a", "b"], ["World"]), ((["a"], "World"), None)])
def test_evaluate_refuses_texts_without_their_labels(data, labels):
    with pytest.raises(loracls.LoraclsError) as e:
        Predictor(_AlwaysWorld()).evaluate(data, labels=labels)
    assert "\n" not in str(e.value) and "label" in str(e.value)


def test_evaluate_maps_labels_as_a_file_would():
    clf = Predictor(_AlwaysWorld())
    # 1, "1", "+1" and "1.0" are AG News' value for World; names match in any case
    gold = [1, "1", "+1", "1.0", "world", " WORLD ", "Sports", 2, "sci/tech", np.int64(3)]
    m = clf.evaluate(["t"] * len(gold), labels=gold)
    assert [row[0] for row in m["confusion_matrix"]] == [6, 2, 1, 1] and m["accuracy"] == pytest.approx(0.6)
    assert clf.evaluate((["t", "t"], ["World", "Sports"]))["confusion_matrix"] == \
        clf.evaluate(["t", "t"], labels=["1", "2"])["confusion_matrix"]
    assert clf.evaluate("one text", labels="World")["accuracy"] == 1.0
    with pytest.raises(loracls.LoraclsError, match="'Weather', which is none of the run's 4 classes"):
        clf.evaluate(["t", "t"], labels=["World", "Weather"])


# -- rank="auto" and the sweep's fixed part, from Python --------------------------------------------------------------
def test_api_train_rank_auto_fits_the_budget(tiny_bert_dir, small_agnews, tmp_path, capsys):
    from loracls import planning
    from loracls.config import LoraSettings

    with pytest.raises(loracls.LoraclsError, match="budget"):
        loracls.train(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"), rank="auto")
    budget = 5000
    result = loracls.train(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"), rank="auto",
                           budget=budget, output_dir=str(tmp_path / "run"), epochs=1, max_length=32,
                           max_train_samples=32, progress=False)
    assert result.metrics["parameters"]["trainable"] <= budget
    assert "max_trainable: 5000" in (result.run_dir / "config.yaml").read_text()  # the budget is enforced too
    rank = loracls.make_config(result.run_dir / "config.yaml").lora.rank
    cfg = planning.read_model_config(str(tiny_bert_dir))
    assert planning.count(cfg, 4, LoraSettings(rank=rank + 1)).trainable > budget
    assert loracls.plan(str(tiny_bert_dir), rank="auto", budget=budget).lora.rank == rank
    assert f"rank auto picked r={rank}" in capsys.readouterr().err


def test_sweep_refuses_what_it_chooses_and_checks_before_writing(tiny_bert_dir, small_agnews, tmp_path):
    out = tmp_path / "sweep"
    for given in ({"rank": 4}, {"lr": 1e-3}, {"alpha": 8.0}):
        with pytest.raises(loracls.LoraclsError, match="the sweep chooses"):
            loracls.sweep(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"), budget=4000,
                          output_dir=str(out), **given)
    with pytest.raises(loracls.LoraclsError, match="validation"):
        loracls.sweep(model=str(tiny_bert_dir), train=str(small_agnews / "train.csv"), budget=4000,
                      output_dir=str(out), validation_fraction=0.0)
    with pytest.raises(loracls.LoraclsError, match="does not exist"):
        loracls.sweep(model=str(tiny_bert_dir), train=str(tmp_path / "missing.csv"), budget=4000,
                      output_dir=str(out))
    assert not out.exists()


# -- a sweep trial that fails, or is interrupted: one line each ------------------------------------------------------
def _sweep_cmd(model_dir, train, test, out, trials):
    return [sys.executable, "-m", "loracls", "sweep", "--model", str(model_dir), "--train", str(train), "--test",
            str(test), "--output-dir", str(out), "--budget", "4000", "--trials", str(trials), "--method", "lora",
            "--epochs", "2", "--max-train-samples", "64", "--max-eval-samples", "32", "--max-length", "24"]


@pytest.mark.slow
def test_a_failed_trial_is_one_line_and_a_sweep_with_none_complete_exits_2(tiny_bert_dir, small_agnews, tmp_path):
    bad_test = tmp_path / "test.csv"  # a class the training data does not have: every trial's data check fails
    bad_test.write_text('"9","A headline","A description"\n' + (small_agnews / "test.csv").read_text())
    out = tmp_path / "sweep"
    res = subprocess.run(_sweep_cmd(tiny_bert_dir, small_agnews / "train.csv", bad_test, out, 1),
                         capture_output=True, text=True, timeout=600, check=False)
    # With no trial complete the sweep has no result: exit 2, after the trial's own line, saying why
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "loracls: trial 0 failed: " in res.stderr
    lines = res.stderr.strip().splitlines()
    failed = [line for line in lines if line.startswith("loracls: trial")]
    assert len(failed) == 1 and re.search("label '?9", failed[0]), res.stderr[-2000:]
    assert lines[-1].startswith("loracls sweep: error: no trial of the sweep") and "1 failed" in lines[-1], lines[-1]
    assert re.search("label '?9", lines[-1]) and "leaderboard.md" in lines[-1]
    row = json.loads((out / "leaderboard.json").read_text())["trials"][0]
    assert row["state"] == "fail" and re.search("label '?9", row["error"])
    assert not (out / "best").exists()


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_in_one_line(tiny_bert_dir, small_agnews, tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.Popen(_sweep_cmd(tiny_bert_dir, small_agnews / "train.csv", small_agnews / "test.csv", out, 3),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any((out / "trials").glob("*/config.yaml")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "sweep interrupted; run the same command again" in err, err[-2000:]


# -- main() and the caller's SIGALRM ----------------------------------------------------------------------------------
def test_main_restores_the_callers_alarm(monkeypatch):
    """An interrupt that lands during an import arms a SIGALRM timer; main() disarms it and gives SIGALRM back,
    and never touches a timer of the program that called it."""
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGALRM, mine)
    try:
        monkeypatch.setattr(cli, "_importing", lambda frame: True)
        monkeypatch.setattr(cli, "_run", lambda argv: cli._interrupt(signal.SIGTERM, None) or 0)
        assert cli.main([]) == 0
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        signal.setitimer(signal.ITIMER_REAL, 60)
        monkeypatch.setattr(cli, "_run", lambda argv: 0)
        assert cli.main([]) == 0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
