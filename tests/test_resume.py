"""Checkpoint and resume: a run killed at any instant resumes to exactly the result of an uninterrupted run; a resume
opens the run under its lock, reads run.json once, and releases the lock when it refuses (a completed run, a corrupt
run.json, another format of run or checkpoint)."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import interrupted_run, loracls_command, predicted_probs, train_args
from loracls import training
from loracls.cli import main
from loracls.errors import LoraclsError
from loracls.rundir import LOCK, RUN_FORMAT_VERSION, RunDir, RunLock


def _args(model_dir, data_dir, out):
    return train_args(model_dir, data_dir / "train.csv", out, "--test", data_dir / "test.csv", "--epochs", "3",
                      "--batch-size", "8", "--max-length", "40", "--device", "cpu", "--save-every-steps", "3",
                      "--log-every", "4", "--lr", "1e-3", "--seed", "7")


def _probs(run: Path, data_dir: Path, tmp: Path) -> np.ndarray:
    return predicted_probs(run, data_dir / "test.csv", tmp / f"pred-{run.name}.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir, small_agnews):
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "uninterrupted"
    assert main(_args(tiny_bert_dir, small_agnews, run)) == 0
    # How long the training window lasts on this machine (labels.json is written as training starts).
    window = (run / "metrics.json").stat().st_mtime - (run / "labels.json").stat().st_mtime
    return _probs(run, small_agnews, tmp), json.loads((run / "metrics.json").read_text()), window


def _start(args, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(loracls_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.02)
    return True


def _check_integrity(run: Path):
    """Whatever instant the kill hit, every file present is complete and readable."""
    from safetensors.torch import load_file

    for name in ("run.json", "labels.json", "metrics.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    for line in (run / "history.jsonl").read_text().splitlines() if (run / "history.jsonl").exists() else []:
        json.loads(line)
    if (run / "adapter" / "adapter_model.safetensors").exists():
        load_file(str(run / "adapter" / "adapter_model.safetensors"))
        json.loads((run / "adapter" / "adapter_config.json").read_text())
    if (run / "checkpoint" / "state.pt").exists():
        torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    leftovers = [p.name for p in run.rglob("*.tmp")]
    return leftovers


def _resume_until_done(run: Path, max_tries=5):
    for _ in range(max_tries):
        res = subprocess.run(loracls_command("train", "--resume", run, "--no-progress"), capture_output=True,
                             text=True, timeout=600)
        if res.returncode == 0:
            return
        assert res.returncode == 2, res.stderr[-2000:]
    raise AssertionError("resume did not finish")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(reference, tiny_bert_dir, small_agnews, tmp_path):
    ref_probs, ref_metrics, _ = reference
    run = tmp_path / "killed"
    proc = _start(_args(tiny_bert_dir, small_agnews, run))
    assert _wait_for(run / "checkpoint" / "state.pt", proc), proc.communicate()[1][-2000:]
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if json.loads((run / "run.json").read_text())["status"] == "completed":
        pytest.skip("training finished before the kill landed (machine too fast for this timing)")
    _check_integrity(run)
    _resume_until_done(run)
    probs = _probs(run, small_agnews, tmp_path)
    assert np.abs(probs - ref_probs).max() <= 1e-6
    m = json.loads((run / "metrics.json").read_text())
    assert m["test"]["accuracy"] == ref_metrics["test"]["accuracy"]
    assert m["run"]["best_epoch"] == ref_metrics["run"]["best_epoch"]


@pytest.mark.slow
def test_ctrl_c_saves_prints_resume_command_and_exits_130(reference, tiny_bert_dir, small_agnews, tmp_path):
    ref_probs, _, _ = reference
    run = tmp_path / "interrupted"
    proc = _start(_args(tiny_bert_dir, small_agnews, run))
    assert _wait_for(run / "checkpoint" / "state.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"loracls train --resume {run}" in err and "Traceback" not in err
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    _resume_until_done(run)
    assert np.abs(_probs(run, small_agnews, tmp_path) - ref_probs).max() <= 1e-6


@pytest.mark.slow
def test_fault_injection_random_kills(reference, tiny_bert_dir, small_agnews, tmp_path):
    """Kill the same run at a few random instants (seeded, bounded), resuming in between; integrity holds after
    every kill and the final result equals the uninterrupted run's."""
    ref_probs, _, window = reference
    rng = random.Random(1234)
    run = tmp_path / "faulty"
    proc = _start(_args(tiny_bert_dir, small_agnews, run))
    started_after = 0.0
    kills = 0
    for attempt in range(3):
        # wait until this process has (re)written run.json, i.e. it is past start-up and training,
        # then kill it at a random instant inside the training window
        # (the first kill waits for the first checkpoint, so at least one kill lands mid-training)
        marker = run / "checkpoint" / "state.pt" if attempt == 0 else run / "run.json"
        while not (marker.exists() and marker.stat().st_mtime > started_after):
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, (0.3 if attempt == 0 else 0.8) * window))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        # SIGKILL runs no cleanup: a write it cut leaves its hidden temporary beside the intact real file
        assert all(n.startswith(".") and n.endswith(".tmp") for n in _check_integrity(run))
        status = json.loads((run / "run.json").read_text())["status"]
        if status == "completed":
            break
        started_after = time.time()
        if not (run / "checkpoint" / "state.pt").exists():
            # killed before the first checkpoint: predict must refuse, and the run starts over
            if not (run / "adapter").exists():
                assert main(["predict", str(run), "--input", str(small_agnews / "test.csv"),
                             "--output", str(tmp_path / "x.jsonl")]) == 2
            proc = _start(_args(tiny_bert_dir, small_agnews, run) + ["--overwrite"])
        else:
            proc = _start(["train", "--resume", str(run), "--no-progress"])
    if proc.poll() is None:
        proc.wait(timeout=600)
    if json.loads((run / "run.json").read_text())["status"] != "completed":
        _resume_until_done(run)
    assert kills >= 1
    assert _check_integrity(run) == [], "a resumed run removes the temporaries its killed writers left"
    assert np.abs(_probs(run, small_agnews, tmp_path) - ref_probs).max() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["cuda", "cpu-bf16"])
def test_resume_under_the_bf16_policies_matches_uninterrupted(tiny_bert_dir, small_agnews, tmp_path, monkeypatch,
                                                              policy):
    """The fast backend's bf16 execution policies run on the CPU: CUDA's (bf16 storage, F.dropout, SDPA with the
    mask, one attention group) and the CPU one `--precision bf16` picks.  A run stopped right after its second
    checkpoint, then resumed, ends with exactly the adapter of an uninterrupted run."""
    from safetensors.torch import load_file

    import loracls.backends.fast.model as fast_model
    from loracls.backends.fast import CUDA, policy_for

    policies = []

    def recorded(device, precision=None):
        policies.append(device)
        return CUDA if policy == "cuda" else policy_for(device, precision)

    monkeypatch.setattr(fast_model, "policy_for", recorded)

    def args(out):  # the module's run, 2 epochs, no test set
        a = _args(tiny_bert_dir, small_agnews, out)
        i = a.index("--test")
        return [*a[:i], *a[i + 2:], "--epochs", "2", "--backend", "fast",
                *(["--precision", "bf16"] if policy == "cpu-bf16" else [])]

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(args(whole)) == 0
    info = json.loads((whole / "run.json").read_text())
    assert info["backend"] == "fast" and info["precision"] == "bf16"
    assert policies, "the fast backend never asked for its execution policy: the bf16 one was not tested"

    assert interrupted_run(args(stopped), checkpoints=2) == 130
    assert json.loads((stopped / "run.json").read_text())["status"] == "interrupted"
    policies.clear()
    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 0
    assert policies, "the resumed run did not build under the patched policy"
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- opening a run for resume --------------------------------------------------------------------------------------
def _run_folder(tmp_path: Path, info) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(info if isinstance(info, str) else json.dumps(info))
    return run


def test_resuming_a_completed_run_is_refused_and_unlocked(tmp_path):
    run = _run_folder(tmp_path, {"status": "completed", "format_version": RUN_FORMAT_VERSION})
    with pytest.raises(LoraclsError, match="already completed"):
        training._open_for_resume(str(run))
    assert not (run / LOCK).exists()
    RunLock(run).acquire("train --resume").release()


@pytest.mark.parametrize("info, words", [("{not json", "corrupt"),
                                         ({"status": "interrupted", "format_version": 99}, "format version")])
def test_a_refused_resume_releases_its_lock(tmp_path, info, words):
    run = _run_folder(tmp_path, info)
    with pytest.raises(LoraclsError, match=words):
        training._open_for_resume(str(run))
    assert not (run / LOCK).exists()
    RunLock(run).acquire("train --resume").release()


def test_resume_opens_with_run_json_read_once_under_the_lock(tmp_path, monkeypatch):
    run = _run_folder(tmp_path, {"status": "interrupted", "format_version": RUN_FORMAT_VERSION})
    reads, real = [], RunDir.read_info

    def read_info(self):
        reads.append((self.path / LOCK).exists())
        return real(self)

    monkeypatch.setattr(RunDir, "read_info", read_info)
    opened = training._open_for_resume(str(run))
    try:
        assert reads == [True] and opened.info["status"] == "interrupted"
    finally:
        opened.release()


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    from loracls import checkpoint

    path = tmp_path / "run" / "checkpoint" / "state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"version": 1, "rng": {"torch": torch.get_rng_state()}}, path)  # version 1: rng a dict or a list
    with pytest.raises(LoraclsError, match=r"incompatible loracls \(format 1, this one reads 2\).*--overwrite"):
        checkpoint.load(path)


def test_ctrl_c_during_the_last_epoch_stops_and_resume_finishes(reference, tiny_bert_dir, small_agnews, tmp_path,
                                                                monkeypatch):
    """A stop that lands after the last epoch's step boundaries (while it validates) is not lost: the command
    exits 130 and `resume` finishes the run to the uninterrupted result.  A sweep relies on this to stop."""
    ref_probs, _, _ = reference
    real_keep = training.keep_if_best

    def keep_then_ctrl_c(run, config, model, state, score):
        real_keep(run, config, model, state, score)
        if state.epoch == config.train.epochs - 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(training, "keep_if_best", keep_then_ctrl_c)
    run = tmp_path / "stopped-late"
    assert main(_args(tiny_bert_dir, small_agnews, run)) == 130
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(training, "keep_if_best", real_keep)
    _resume_until_done(run)
    assert np.abs(_probs(run, small_agnews, tmp_path) - ref_probs).max() <= 1e-6
