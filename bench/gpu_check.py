#!/usr/bin/env python3
"""The GPU check: one command that tests and measures the CUDA path, fast backend beside the baseline.

    make gpu-check                      # on a CUDA machine: full sizes, <= 8 minutes on an H200
    python bench/gpu_check.py --smoke   # the same code on the CPU at tiny sizes (part of the test suite)

It writes one JSON and a short markdown table, bench/results/gpu-check-YYYYMMDD-HHMMSS.{json,md} (or under
--out).  Sections, each with the fast backend beside the baseline measured in the same invocation:

    tests             parity invariants on the device: logits against transformers + PEFT, one step changes
                      only the trainables, save/load, merge (tiny BERT and RoBERTa); plus `pytest -m cuda` when
                      pytest is installed (passed only when at least one test ran and passed: all-skipped says why)
    train_throughput  roberta-base shape, random weights, real AG News token lengths, the reference LoRA
                      (925,444 trainables), batch 16 and 128: samples/s of fast and of peft (fp32, as the
                      reference project ran it)
    inference         the 7,600 official test texts: fast, peft at batch 16 in fp32, and a strong transformers
                      baseline (bf16, SDPA, length-sorted batches of 256); seconds each
    time_to_accuracy  the MiniLM reference recipe at full scale (shared data, 3 epochs, batch 16) through the CLI,
                      fast vs peft: wall time and test accuracy (which must agree within 0.5 points)
    memory            peak device memory per backend during training

Every section has a time budget; a section stops at it rather than overrun, and records what it skipped.  --smoke
has no budgets (its sizes are tiny, so it always does the same work, however loaded the machine) and uses one tiny
RoBERTa (roberta-base's tokenizer, 2 layers of 64) for every section, the time-to-accuracy one included.  Data
and models come from .device-bundle/ (../shared/tools/device-bundle) or ../shared and the MiniLM package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: data and model locations, machine name)

# seconds per section; the whole check stays under 8 minutes on an H200 (--smoke: none, see the docstring)
BUDGETS = {"tests": 45, "train_throughput": 110, "inference": 60, "time_to_accuracy": 240}
FULL = {"train_batches": (16, 128), "train_steps": 40, "infer_texts": None, "acc_train_rows": None,
        "acc_test_rows": None, "acc_epochs": 3, "acc_max_length": None, "tiny_roberta": False}
SMOKE = {"train_batches": (4, 8), "train_steps": 2, "infer_texts": 32, "acc_train_rows": 48,
         "acc_test_rows": 32, "acc_epochs": 1, "acc_max_length": 32, "tiny_roberta": True}
TARGETS = {"train_speedup_vs_peft": 10.0, "train_samples_per_s": 15000, "inference_seconds_7600": 0.3,
           "time_to_accuracy_fraction": 0.1, "accuracy_agreement_points": 0.5}


class Budget:
    """Wall-clock budget of one section; None: no limit (--smoke), so the work done never depends on the load."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = (math.inf if seconds is None else seconds), time.perf_counter()

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def timeout(self, margin: float = 0.0, least: float = 5.0) -> float | None:
        """A subprocess timeout that ends within the budget (None without one)."""
        return None if math.isinf(self.seconds) else max(least, self.left - margin)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def texts(path: Path, n: int | None) -> tuple[list[str], list[int]]:
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        rows = list(itertools.islice(csv.reader(f), n))
    return [" ".join(r[1:]) for r in rows], [int(r[0]) - 1 for r in rows]


def roberta_shape(work: Path, tiny: bool) -> Path:
    """roberta-base's architecture (tiny: 2 layers of 64) with random weights and its real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, RobertaModel

    folder = work / ("roberta-tiny" if tiny else "roberta-base-random")
    if folder.is_dir():
        return folder
    cfg = AutoConfig.from_pretrained(bench.roberta_files())
    if tiny:
        cfg.update(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    torch.manual_seed(0)
    RobertaModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(bench.roberta_files())).save_pretrained(folder)
    return folder


def build(model_dir: Path, backend: str, lora=None, num_labels: int = 4, seed: int = 0):
    from loracls import build as builder
    from loracls.config import LoraSettings

    base = builder.base_model(str(model_dir))
    return builder.classifier(base, num_labels, lora or LoraSettings(), backend=backend, device=device(),
                              seed=seed, precision="auto").model, base.tokenizer


# -- tests --------------------------------------------------------------------------------------------------------
def section_tests(p: dict, work: Path, budget: Budget) -> dict:
    """Parity invariants of the fast backend on this device against transformers + PEFT on the same device."""
    import torch

    from loracls import peft_format
    from loracls.config import LoraSettings

    checks, skipped = [], []
    tol = 0.08 if device().type == "cuda" else 1e-4  # bf16 storage on CUDA
    lora = LoraSettings(rank=4, alpha=8, targets=["query", "key", "value", "ffn-out"])
    sample = ["Stocks rallied after the bank held rates.", "The team won the final in overtime.", "Oil"]
    models = {"roberta": roberta_shape(work, tiny=True), "bert": tiny_bert(work)}
    for name, folder in models.items():
        if budget.left < 5:
            skipped.append(f"{name}: over the section's budget")
            continue
        fast, tok = build(folder, "fast", lora)
        peft, _ = build(folder, "peft", lora, seed=1)
        g = torch.Generator().manual_seed(0)
        state = {k: (torch.randn(v.shape, generator=g) * 0.3 if "lora_A" not in k else v)
                 for k, v in peft.adapter_state_dict().items()}
        peft.load_adapter_state_dict(state)
        fast.load_adapter_state_dict(state)
        ids = tok(sample)["input_ids"]
        with torch.no_grad():
            a, b = fast.eval()(fast.collate(ids)), peft.eval()(peft.collate(ids))
        checks.append({"check": "logits = transformers + PEFT", "model": name,
                       "max_abs_diff": float((a - b).abs().max()), "ok": bool((a - b).abs().max() <= tol)})
        with tempfile.TemporaryDirectory() as d:
            peft_format.write_adapter(d, peft_format.adapter_config(lora, fast.layout, base_model="x"),
                                      fast.adapter_state_dict())
            other, _ = build(folder, "fast", lora, seed=7)
            other.load_adapter_state_dict(peft_format.read_adapter(d)[1])
            with torch.no_grad():
                same = torch.equal(other.eval()(other.collate(ids)), a)
        checks.append({"check": "save/load gives identical logits", "model": name, "ok": same})
        frozen = {n: t.clone() for n, t in fast.named_buffers()}
        before = {n: p_.detach().clone() for n, p_ in fast.trainable_named_parameters()}
        opt = torch.optim.AdamW([p_ for _, p_ in fast.trainable_named_parameters()], lr=1e-2)
        for _ in range(2):
            torch.nn.functional.cross_entropy(fast.train()(fast.collate(ids)),
                                              torch.tensor([0, 1, 2], device=device())).backward()
            opt.step()
            opt.zero_grad()
        only = all(torch.equal(frozen[n], t) for n, t in fast.named_buffers()) and \
            all(not torch.equal(before[n], p_) for n, p_ in fast.trainable_named_parameters())
        checks.append({"check": "a step changes only the trainables", "model": name, "ok": only})
        fast.load_adapter_state_dict(state)
        with torch.no_grad():
            unmerged = fast.eval()(fast.collate(ids))
            fast.merge()
            merged = fast(fast.collate(ids))
        checks.append({"check": "merged = unmerged", "model": name, "max_abs_diff": float((merged - unmerged)
                       .abs().max()), "ok": bool((merged - unmerged).abs().max() <= tol)})
    cuda_tests = pytest_cuda(budget)
    return {"checks": checks, "pytest_cuda": cuda_tests,
            "ok": all(c["ok"] for c in checks) and cuda_tests["passed"] is not False, "skipped": skipped}


def tiny_bert(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = work / "bert-tiny"
    if not folder.is_dir():
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128)).save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(bench.minilm_dir())).save_pretrained(folder)
    return folder


def pytest_cuda(budget: Budget) -> dict:
    """The tests marked `cuda` (genuine CUDA-only differences), when pytest is installed and CUDA visible.
    `passed`: True when they ran and at least one passed with none failing, False when they failed or none
    passed (all skipped, say, for want of a fixture's files: the reasons are kept), None when not run here."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA device", "passed": None}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "not run: pytest is not installed on this machine (the parity checks above ran "
                          "without it)", "passed": None}
    return run_pytest(["-m", "cuda", str(ROOT / "tests")], ROOT, budget.timeout(least=30.0))


def run_pytest(args: list[str], cwd: Path, timeout: float | None) -> dict:
    """`python -m pytest -rA ARGS` in a fresh process with src/ importable; its counts from pytest's own summary."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args],
                             capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"not passed: stopped at the section's budget ({timeout:.0f} s)", "passed": False}
    return {**pytest_verdict(res.returncode, res.stdout), "tail": (res.stdout + res.stderr)[-800:]}


def pytest_verdict(returncode: int, output: str) -> dict:
    """Passed only when pytest exited 0 and at least one test passed; the counts of its summary line (the last
    line of its standard output that has any), and the reasons of its skips (-rA's SKIPPED lines)."""
    summary = [line for line in output.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors|"
                                                                 r"no tests ran|deselected)\b", line)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|"
                                                r"deselected)", summary[-1] if summary else "")}
    reasons = sorted({m.strip() for m in re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", output, re.M)})
    ran = {k: v for k, v in counts.items() if k != "deselected"}
    if returncode == 0 and counts.get("passed", 0) > 0:
        status, passed = f"passed ({', '.join(f'{v} {k}' for k, v in ran.items())})", True
    elif returncode in (0, 5):  # 5: no test collected
        what = ", ".join(f"{v} {k}" for k, v in ran.items()) or "none collected"
        status, passed = f"not passed: no test passed ({what})", False
    else:
        status, passed = f"failed (exit {returncode}: {', '.join(f'{v} {k}' for k, v in ran.items())})", False
    return {"status": status, "passed": passed, "counts": counts, "skip_reasons": reasons}


# -- throughput -----------------------------------------------------------------------------------------------------
def section_train_throughput(p: dict, work: Path, budget: Budget, memory: list) -> dict:
    import torch
    import torch.nn.functional as F

    from loracls.config import LoraSettings, TrainSettings
    from loracls.models import tokenize
    from loracls.training import make_optimizer

    model_dir = roberta_shape(work, p["tiny_roberta"])
    lora = LoraSettings(rank=6, alpha=24, dropout=0.1, targets=["query", "key", "value"])
    rows, skipped = [], []
    per_run = budget.seconds / (2 * len(p["train_batches"]))  # inf without a budget
    for batch in p["train_batches"]:
        for backend in ("peft", "fast"):
            if budget.left < 5:
                skipped.append(f"{backend} batch {batch}: over the section's budget")
                continue
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model, tok = build(model_dir, backend, lora)
            train_texts, labels = texts(bench.data_dir() / "train.csv", batch * (p["train_steps"] + 3))
            ids, _ = tokenize(tok, train_texts, 256)
            y = torch.tensor(labels, device=device())
            opt = make_optimizer(model, TrainSettings(), device())
            model.train()
            steps, seen, tokens, t0 = 0, 0, 0, None
            deadline = time.perf_counter() + min(per_run, budget.left - 2)
            for s in range(p["train_steps"] + 3):
                if s == 3:  # three warm-up steps: allocator, kernels, autotuning
                    sync()
                    t0 = time.perf_counter()
                idx = list(range(s * batch, (s + 1) * batch))
                logits = model(model.collate([ids[i] for i in idx]))
                F.cross_entropy(logits, y[idx]).backward()
                torch.nn.utils.clip_grad_norm_([q for _, q in model.trainable_named_parameters()], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if t0 is not None:
                    steps, seen, tokens = steps + 1, seen + batch, tokens + sum(len(ids[i]) for i in idx)
                if time.perf_counter() > deadline and steps >= 1:
                    break
            sync()
            seconds = time.perf_counter() - t0 if t0 else float("nan")
            trainable = sum(q.numel() for _, q in model.trainable_named_parameters())
            rows.append({"backend": backend, "batch": batch, "steps": steps, "trainable": trainable,
                         "samples_per_s": round(seen / seconds, 1), "tokens_per_s": round(tokens / seconds),
                         "precision": "bf16 storage, fp32 LoRA" if backend == "fast" and device().type == "cuda"
                         else "fp32"})
            memory.append({"backend": backend, "where": f"train batch {batch}", "peak_mb": peak_mb()})
            del model, opt
    ratios = {}
    for batch in p["train_batches"]:
        by = {r["backend"]: r for r in rows if r["batch"] == batch}
        if len(by) == 2:
            ratios[f"batch {batch} fast/peft"] = round(by["fast"]["samples_per_s"] / by["peft"]["samples_per_s"], 2)
    return {"model": str(model_dir.name), "rows": rows, "ratios": ratios, "skipped": skipped}


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process-wide on the CPU


# -- inference -------------------------------------------------------------------------------------------------------
def section_inference(p: dict, work: Path, budget: Budget) -> dict:

    from loracls.config import LoraSettings
    from loracls.torch_inference import predict_outputs
    from loracls.models import tokenize
    from loracls.tasks import get_task

    model_dir = roberta_shape(work, p["tiny_roberta"])
    test_texts, _ = texts(bench.data_dir() / "test.csv", p["infer_texts"])
    rows, skipped = [], []
    lora = LoraSettings(rank=6, alpha=24, targets=["query", "key", "value"])
    task = get_task("single-label")
    for backend, batch in (("fast", 256), ("peft", 16)):
        if budget.left < 5:
            skipped.append(f"{backend}: over the section's budget")
            continue
        model, tok = build(model_dir, backend, lora)
        model.merge()
        t0 = time.perf_counter()
        ids, _ = tokenize(tok, test_texts, 256)
        tok_s = time.perf_counter() - t0
        predict_outputs(model, task, ids[:batch], batch)  # warm-up
        sync()
        t0 = time.perf_counter()
        predict_outputs(model, task, ids, batch)
        sync()
        rows.append({"backend": backend, "batch": batch, "texts": len(ids), "seconds": round(time.perf_counter() - t0, 3),
                     "tokenize_seconds": round(tok_s, 3)})
        del model
    if budget.left > 5:
        rows.append(strong_transformers_baseline(model_dir, test_texts))
    else:
        skipped.append("transformers bf16 baseline: over the section's budget")
    return {"model": model_dir.name, "rows": rows, "skipped": skipped}


def strong_transformers_baseline(model_dir: Path, test_texts: list[str]) -> dict:
    """Plain transformers done well: bf16 (on CUDA), SDPA attention, batches of 256 sorted by length."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4, dtype=dtype,
                                                               attn_implementation="sdpa").to(device()).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(test_texts, truncation=True, max_length=256)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))

    def run_all():
        with torch.inference_mode():
            for s in range(0, len(order), 256):
                batch = tok.pad({"input_ids": [enc[i] for i in order[s:s + 256]]}, return_tensors="pt")
                model(**{k: v.to(device()) for k, v in batch.items()}).logits.float().softmax(-1)

    run_all()  # warm-up
    sync()
    t0 = time.perf_counter()
    run_all()
    sync()
    return {"backend": "transformers (bf16, SDPA, sorted, batch 256)", "batch": 256, "texts": len(enc),
            "seconds": round(time.perf_counter() - t0, 3)}


# -- time to accuracy --------------------------------------------------------------------------------------------------
def section_time_to_accuracy(p: dict, work: Path, budget: Budget) -> dict:
    data = bench.data_dir()
    (work / "acc").mkdir(parents=True, exist_ok=True)
    train = bench.head_rows(data / "train.csv", work / "acc" / "train.csv", p["acc_train_rows"])
    test = bench.head_rows(data / "test.csv", work / "acc" / "test.csv", p["acc_test_rows"])
    model = roberta_shape(work, tiny=True) if p["tiny_roberta"] else bench.minilm_dir()
    rows, skipped = [], []
    for backend in ("fast", "peft"):
        if budget.left - 5 < 10:
            skipped.append(f"{backend}: over the section's budget")
            continue
        timeout = budget.timeout(margin=5)
        out = work / f"acc-{backend}"
        args = [sys.executable, "-m", "loracls", "train", "--model", str(model), "--train", str(train),
                "--test", str(test), "--output-dir", str(out), "--backend", backend, "--epochs",
                str(p["acc_epochs"]), "--batch-size", "16", "--no-progress", "--overwrite"]
        if p["acc_max_length"]:
            args += ["--max-length", str(p["acc_max_length"])]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        try:
            res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            skipped.append(f"{backend}: stopped at the section's budget ({timeout:.0f} s)")
            continue
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            rows.append({"backend": backend, "error": res.stderr[-800:]})
            continue
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"backend": backend, "wall_seconds": round(wall, 1),
                     "train_seconds": round(m["timings"]["train_seconds"], 3),  # smoke runs train in ~0.05 s
                     "train_samples_per_s": round(m["throughput"]["train_samples_per_second"], 1),
                     "test_accuracy": round(m["test"]["accuracy"], 4), "train_examples": m["data"]["train_examples"],
                     "test_examples": m["data"]["test_examples"], "epochs": p["acc_epochs"]})
    by = {r["backend"]: r for r in rows if "test_accuracy" in r}
    out = {"model": model.name if p["tiny_roberta"] else "all-MiniLM-L6-v2", "rows": rows, "skipped": skipped}
    if len(by) == 2:
        out["accuracy_fast_minus_peft_points"] = round(100 * (by["fast"]["test_accuracy"]
                                                              - by["peft"]["test_accuracy"]), 2)
        out["train_time_fast_over_peft"] = round(by["fast"]["train_seconds"] / by["peft"]["train_seconds"], 3)
    return out


# -- the report --------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    s = result["sections"]
    lines = [f"# GPU check, {result['machine']}, {result['date']}{' (smoke, CPU)' if result['smoke'] else ''}", "",
             "| section | fast | baseline | fast vs baseline | target |", "|---|---:|---:|---:|---|"]
    tr = {(r["backend"], r["batch"]): r for r in s.get("train_throughput", {}).get("rows", [])}
    for batch in result["settings"]["train_batches"]:
        f, b = tr.get(("fast", batch)), tr.get(("peft", batch))
        if f and b:
            lines.append(f"| train, batch {batch} (samples/s) | {f['samples_per_s']:,} | {b['samples_per_s']:,} | "
                         f"{f['samples_per_s'] / b['samples_per_s']:.2f}x | >= 10x, >= 15,000/s |")
    inf = {r["backend"]: r for r in s.get("inference", {}).get("rows", [])}
    if "fast" in inf:
        for name, r in inf.items():
            if name != "fast":
                lines.append(f"| inference, {r['texts']:,} texts (s) | {inf['fast']['seconds']} | {r['seconds']} "
                             f"({name}) | {r['seconds'] / max(inf['fast']['seconds'], 1e-9):.2f}x | <= 0.3 s |")
    acc = {r["backend"]: r for r in s.get("time_to_accuracy", {}).get("rows", []) if "test_accuracy" in r}
    if len(acc) == 2:
        f, b = acc["fast"], acc["peft"]
        recipe = "MiniLM recipe" if not result["smoke"] else f"{s['time_to_accuracy']['model']} (smoke)"
        lines.append(f"| {recipe}, train seconds | {f['train_seconds']} | {b['train_seconds']} | "
                     f"{b['train_seconds'] / max(f['train_seconds'], 1e-9):.2f}x | <= 1/10 of peft |")
        lines.append(f"| {recipe}, test accuracy | {100 * f['test_accuracy']:.2f}% | "
                     f"{100 * b['test_accuracy']:.2f}% | {100 * (f['test_accuracy'] - b['test_accuracy']):+.2f} pts "
                     "| within 0.5 pts |")
    mem = {}
    for r in s.get("memory", {}).get("rows", []):
        mem[r["backend"]] = max(mem.get(r["backend"], 0), r["peak_mb"])
    if len(mem) == 2:
        lines.append(f"| peak memory, training (MB) | {mem['fast']:,} | {mem['peft']:,} | "
                     f"{mem['fast'] / max(mem['peft'], 1e-9):.2f}x | <= peft |")
    t = s.get("tests", {})
    lines += ["", f"Parity checks on the device: {sum(c['ok'] for c in t.get('checks', []))} of "
                  f"{len(t.get('checks', []))} passed; pytest -m cuda: {t.get('pytest_cuda', {}).get('status')}."]
    skipped = [f"{k}: {x}" for k, v in s.items() for x in v.get("skipped", [])]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU if no GPU is visible")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and markdown")
    args = ap.parse_args()
    import torch
    import transformers
    import peft

    p = SMOKE if args.smoke else FULL
    budgets = {k: (None if args.smoke else v) for k, v in BUDGETS.items()}  # smoke: the same work at any load
    result = {"machine": bench.machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke,
              "device": str(device()), "versions": {"torch": torch.__version__,
                                                    "transformers": transformers.__version__,
                                                    "peft": peft.__version__},
              "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}, "budgets": budgets,
              "targets": TARGETS, "sections": {}}
    memory: list[dict] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loracls-gpu-check-") as tmp:
        work = Path(tmp)
        for name, fn in (("tests", section_tests), ("train_throughput", section_train_throughput),
                         ("inference", section_inference), ("time_to_accuracy", section_time_to_accuracy)):
            budget = Budget(budgets[name])
            t0 = time.perf_counter()
            try:
                kw = {"memory": memory} if name == "train_throughput" else {}
                result["sections"][name] = fn(p, work, budget, **kw)
            except Exception as e:  # one broken section must not cost the others: record it and go on
                result["sections"][name] = {"error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc()[-3000:], "skipped": [name]}
            result["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"gpu-check: {name} done in {result['sections'][name]['seconds']} s", file=sys.stderr, flush=True)
    result["sections"]["memory"] = {"rows": memory, "unit": "MB, torch.cuda.max_memory_allocated" if
                                    torch.cuda.is_available() else "MB, process peak RSS (CPU)", "skipped": []}
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-check{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"gpu-check: wrote {stem}.json and .md in {result['total_seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
