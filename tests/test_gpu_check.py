"""bench/gpu_check.py --smoke: the GPU check's code, run on the CPU at tiny sizes, so it cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_smoke(tmp_path, agnews_dir, minilm_dir):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    [path] = tmp_path.glob("gpu-check-smoke-*.json")
    result = json.loads(path.read_text())
    assert path.with_suffix(".md").is_file()
    sections = result["sections"]
    assert set(sections) == {"tests", "train_throughput", "inference", "time_to_accuracy", "memory"}
    assert not [k for k, v in sections.items() if "error" in v], {k: v.get("error") for k, v in sections.items()}
    assert sections["tests"]["ok"] and len(sections["tests"]["checks"]) == 8
    for name in ("train_throughput", "inference", "time_to_accuracy", "memory"):
        backends = {r["backend"] for r in sections[name]["rows"]}
        assert {"fast", "peft"} <= backends, (name, backends)
    assert all(r["samples_per_s"] > 0 for r in sections["train_throughput"]["rows"])
    assert "accuracy_fast_minus_peft_points" in sections["time_to_accuracy"]
    assert result["total_seconds"] < 180
