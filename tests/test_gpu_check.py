"""bench/gpu_check.py --smoke: the GPU check's code, run on the CPU at tiny sizes, so it cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke(tmp_path, agnews_dir, minilm_dir):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    [path] = tmp_path.glob("gpu-check-smoke-*.json")
    result = json.loads(path.read_text())
    settings, sections = result["settings"], result["sections"]
    assert set(sections) == {"tests", "train_throughput", "inference", "time_to_accuracy", "memory"}
    assert not [k for k, v in sections.items() if "error" in v], {k: v.get("error") for k, v in sections.items()}
    assert not [x for v in sections.values() for x in v["skipped"]]  # smoke has no budgets: nothing is cut

    tests = sections["tests"]
    assert tests["ok"] and len(tests["checks"]) == 8 and all(c["ok"] for c in tests["checks"])
    assert {c["model"] for c in tests["checks"]} == {"bert", "roberta"}
    diffs = [c["max_abs_diff"] for c in tests["checks"] if "max_abs_diff" in c]
    assert len(diffs) == 4 and max(diffs) <= 1e-4  # fp32 on the CPU: transformers + PEFT's logits, merged
    assert tests["pytest_cuda"]["passed"] is None and "no CUDA" in tests["pytest_cuda"]["status"]

    train = sections["train_throughput"]
    by = {(r["backend"], r["batch"]): r for r in train["rows"]}
    assert set(by) == {(b, n) for b in ("fast", "peft") for n in settings["train_batches"]}
    assert all(r["steps"] == settings["train_steps"] for r in train["rows"])
    assert len({r["trainable"] for r in train["rows"]}) == 1  # the same LoRA in both backends
    for n in settings["train_batches"]:
        ratio = train["ratios"][f"batch {n} fast/peft"]
        assert ratio > 0 and ratio == round(by["fast", n]["samples_per_s"] / by["peft", n]["samples_per_s"], 2)

    inference = {r["backend"].split()[0]: r for r in sections["inference"]["rows"]}
    assert set(inference) == {"fast", "peft", "transformers"}
    assert all(r["texts"] == settings["infer_texts"] and r["seconds"] > 0 for r in inference.values())

    acc = sections["time_to_accuracy"]
    rows = {r["backend"]: r for r in acc["rows"]}
    assert set(rows) == {"fast", "peft"} and acc["model"] == "roberta-tiny"
    assert rows["fast"]["train_examples"] == rows["peft"]["train_examples"] > 0
    assert rows["fast"]["test_examples"] == rows["peft"]["test_examples"] == settings["acc_test_rows"]
    assert acc["accuracy_fast_minus_peft_points"] == pytest.approx(
        100 * (rows["fast"]["test_accuracy"] - rows["peft"]["test_accuracy"]), abs=0.02)
    assert acc["train_time_fast_over_peft"] > 0

    memory = sections["memory"]["rows"]
    assert {(r["backend"], r["where"]) for r in memory} == {(b, f"train batch {n}") for b in ("fast", "peft")
                                                            for n in settings["train_batches"]}
    markdown = path.with_suffix(".md").read_text()
    assert "8 of 8 passed" in markdown and all(f"| train, batch {n} " in markdown for n in settings["train_batches"])


def test_pytest_cuda_counts_only_tests_that_passed(tmp_path):
    """The check's verdict on a real pytest run: all skipped (as the cuda tests are when a fixture's files are
    missing) is not a pass, and says why; one test passed is."""
    gpu_check = _gpu_check()
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_a():\n    pytest.skip('MiniLM files are missing')\n\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\ndef test_b():\n    pass\n")
    skipped = gpu_check.run_pytest([str(tmp_path / "test_skips.py")], tmp_path, 120)
    assert skipped["passed"] is False and skipped["status"].startswith("not passed: no test passed (2 skipped")
    assert skipped["skip_reasons"] == ["MiniLM files are missing", "needs a CUDA GPU"]
    (tmp_path / "test_pair.py").write_text("def test_one():\n    assert 1\n\ndef test_two():\n    assert 0\n")
    failed = gpu_check.run_pytest([str(tmp_path / "test_pair.py")], tmp_path, 120)
    assert failed["passed"] is False and failed["counts"] == {"failed": 1, "passed": 1}
    passed = gpu_check.run_pytest([str(tmp_path / "test_pair.py"), "-k", "test_one"], tmp_path, 120)
    assert passed["passed"] is True and passed["counts"] == {"passed": 1, "deselected": 1}
    empty = gpu_check.run_pytest([str(tmp_path / "test_pair.py"), "-k", "nothing"], tmp_path, 120)
    assert empty["passed"] is False and "no test passed" in empty["status"]
