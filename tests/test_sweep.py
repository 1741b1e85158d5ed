"""`loracls sweep`: a tiny sweep stays within its budget, keeps the dimensions it is told to fix, picks on
validation, writes a leaderboard that agrees with its trials, and continues after SIGKILL without redoing finished
trials, the one the kill cut off marked failed.  It refuses what it chooses and checks its data before writing, and
a trial that fails, or a Ctrl-C, is one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

import loracls
from helpers import loracls_command
from loracls.cli import main


def sweep_args(model_dir, train, test, out, trials=3):
    return ["sweep", "--model", str(model_dir), "--train", str(train), "--test", str(test), "--output-dir", str(out),
            "--budget", "4000", "--trials", str(trials), "--method", "lora", "--epochs", "2", "--max-train-samples",
            "64", "--max-eval-samples", "32", "--max-length", "24"]


@pytest.mark.slow
def test_tiny_sweep(tiny_bert_dir, small_agnews, tmp_path, capsys):
    from loracls.families import TARGET_SETS

    out = tmp_path / "sweep"
    searched_sets = dict(TARGET_SETS)
    data = small_agnews / "train.csv", small_agnews / "test.csv"
    assert main([*sweep_args(tiny_bert_dir, *data, out), "--targets", "q,v"]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    finished = [t for t in board["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) == 3 and board["budget"] == 4000
    for t in finished:  # the fixed dimensions held in every trial, and fixing them changed no other sweep
        assert t["params"]["method"] == "lora" and t["params"]["targets"] == "query,value"
        assert t["config"] is None or t["config"]["lora"]["targets"] == ["query", "value"]
    assert TARGET_SETS == searched_sets
    for t in finished:
        for run in t["runs"]:
            m = json.loads((out / "trials" / os.path.basename(run) / "metrics.json").read_text())
            assert m["parameters"]["trainable"] <= 4000 and m["parameters"]["trainable"] == t["trainable"]
            if t["state"] == "complete":
                assert m["validation"]["accuracy"] == pytest.approx(t["validation_accuracy"])
                assert m["test"]["accuracy"] == pytest.approx(t["test_accuracy"])
    complete = [t for t in finished if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["validation_accuracy"])
    assert next(t for t in board["trials"] if t["rank"] == 1)["trial"] == best["trial"]
    assert os.path.realpath(out / "best") == os.path.realpath(best["runs"][0])
    assert (out / "leaderboard.md").read_text().count("\n| ") >= 3 and (out / "leaderboard.png").stat().st_size > 0
    assert "best trial" in capsys.readouterr().out
    other = [*sweep_args(tiny_bert_dir, *data, out), "--targets", "q,v"]
    other[other.index("--method") + 1] = "dora"
    assert main(other) == 2 and "another search" in capsys.readouterr().err


def _finished(board) -> dict[int, dict]:
    if not board.exists():
        return {}
    return {t["trial"]: t for t in json.loads(board.read_text())["trials"] if t["state"] in ("complete", "pruned")}


def _started(out) -> set[int]:
    """Trials whose training has begun (a trial's run directory is named after its number)."""
    return {int(p.parent.name) for p in (out / "trials").glob("*/config.yaml")}


@pytest.mark.slow
def test_killed_sweep_continues_without_redoing_trials(tiny_bert_dir, small_agnews, tmp_path):
    out = tmp_path / "sweep"
    args = loracls_command(*sweep_args(tiny_bert_dir, small_agnews / "train.csv", small_agnews / "test.csv", out,
                                       trials=3))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    board = out / "leaderboard.json"
    deadline = time.time() + 240
    # Kill once a trial has finished and the next one is training: the kill then cuts a trial off mid-sweep.
    while time.time() < deadline and proc.poll() is None:
        if _finished(board) and _started(out) - set(_finished(board)):
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    before = _finished(board)
    cut_off = _started(out) - set(before)
    if len(before) >= 3 or not cut_off:
        pytest.skip("the sweep finished its trials before the kill landed; nothing was cut off")
    stamps = {n: os.stat(t["runs"][0] + "/metrics.json").st_mtime_ns for n, t in before.items()}
    assert before
    assert subprocess.run(args, capture_output=True, text=True, timeout=600, check=False).returncode == 0
    after = json.loads(board.read_text())["trials"]
    finished = [t for t in after if t["state"] in ("complete", "pruned")]
    assert len(finished) == 3
    for n, t in before.items():  # the finished trials were kept, not trained again
        assert os.stat(t["runs"][0] + "/metrics.json").st_mtime_ns == stamps[n]
    states = {t["trial"]: t["state"] for t in after}
    assert all(states[n] == "fail" for n in cut_off), states  # the trial the kill cut off is marked failed
    assert "running" not in states.values()


# -- refused before anything is written ------------------------------------------------------------------------------
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
@pytest.mark.slow
def test_a_failed_trial_is_one_line_and_a_sweep_with_none_complete_exits_2(tiny_bert_dir, small_agnews, tmp_path):
    bad_test = tmp_path / "test.csv"  # a class the training data does not have: every trial's data check fails
    bad_test.write_text('"9","A headline","A description"\n' + (small_agnews / "test.csv").read_text())
    out = tmp_path / "sweep"
    res = subprocess.run(loracls_command(*sweep_args(tiny_bert_dir, small_agnews / "train.csv", bad_test, out, 1)),
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
    proc = subprocess.Popen(loracls_command(*sweep_args(tiny_bert_dir, small_agnews / "train.csv",
                                                        small_agnews / "test.csv", out, 3)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any((out / "trials").glob("*/config.yaml")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "sweep interrupted; run the same command again" in err, err[-2000:]
