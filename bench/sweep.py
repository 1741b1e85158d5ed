#!/usr/bin/env python3
"""Accuracy under a trainable-parameter budget: train each candidate configuration through the `loracls` CLI on
MiniLM and AG News, choose on validation only, and write the table to docs/results.md.

    python bench/sweep.py --scale cpu     # reduced scale, minutes per config on 2 CPU cores
    python bench/sweep.py --scale gpu     # the full shared data (30,000 / 3,333 / official 7,600 test), 3 epochs

Every candidate stays under --budget (1,000,000 by default); `loracls plan` counts it exactly before training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, data_dir, head_rows, machine, minilm_dir, write_result  # noqa: E402

# name -> CLI flags.  The first is the reference recipe; the others spend the budget where it helps.
CANDIDATES = {
    "reference: q,k,v r=6": ["--targets", "q,k,v", "--rank", "6", "--alpha", "24"],
    "all linear r=24 (best PEFT so far)": ["--targets", "q,k,v,attn_out,ffn_in,ffn_out", "--rank", "24",
                                           "--alpha", "48", "--lr", "4e-4", "--batch-size", "32"],
    "all linear r=24 + LoRA+ 4": ["--targets", "q,k,v,attn_out,ffn_in,ffn_out", "--rank", "24", "--alpha", "48",
                                  "--lr", "4e-4", "--batch-size", "32", "--lora-plus-ratio", "4"],
    "all linear r=24 rsLoRA, lr 5e-4, cosine": ["--targets", "q,k,v,attn_out,ffn_in,ffn_out", "--rank", "24",
                                               "--alpha", "48", "--rslora", "--lr", "5e-4", "--batch-size", "32",
                                               "--schedule", "cosine"],
    "all linear r=24, label smoothing 0.1": ["--targets", "q,k,v,attn_out,ffn_in,ffn_out", "--rank", "24",
                                             "--alpha", "48", "--lr", "4e-4", "--batch-size", "32",
                                             "--label-smoothing", "0.1"],
}

SCALES = {
    "cpu": {"train_rows": 3000, "validation_rows": 1000, "test_rows": 2000, "epochs": 2},
    "gpu": {"train_rows": None, "validation_rows": None, "test_rows": None, "epochs": 3},
}


def run_cli(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "loracls", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"sweep: `loracls {' '.join(args)}` failed:\n{res.stderr[-3000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--budget", type=int, default=1_000_000)
    ap.add_argument("--seeds", default="42", help="comma-separated seeds; the table reports their mean")
    ap.add_argument("--only", help="comma-separated candidate indices to run (default all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--write-docs", metavar="MD", help="append the table to this markdown file (docs/results.md)")
    ap.add_argument("--runs", default=None, help="where run directories go (default: a folder under --out)")
    args = ap.parse_args()
    s = SCALES[args.scale]
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / f"sweep-{args.scale}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs.mkdir(parents=True, exist_ok=True)

    # Validation is a fixed slice of train.csv, disjoint from the training rows; test is the official test set.
    lines = (data_dir() / "train.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    n_val = s["validation_rows"] or len(lines) // 10
    train_lines = lines[:-n_val] if s["train_rows"] is None else lines[:s["train_rows"]]
    (runs / "train.csv").write_text("".join(train_lines), encoding="utf-8")
    (runs / "validation.csv").write_text("".join(lines[-n_val:]), encoding="utf-8")
    (runs / "classes.txt").write_text((data_dir() / "classes.txt").read_text(encoding="utf-8"))
    test = head_rows(data_dir() / "test.csv", runs / "test.csv", s["test_rows"])

    chosen = list(CANDIDATES.items())
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for name, flags in chosen:
        per_seed = []
        for seed in seeds:
            run = runs / f"{len(rows)}-{seed}"
            cmd = ["train", "--model", str(minilm_dir()), "--train", str(runs / "train.csv"),
                   "--validation", str(runs / "validation.csv"), "--test", str(test), "--epochs", str(s["epochs"]),
                   "--max-trainable", str(args.budget), "--seed", str(seed), "--output-dir", str(run),
                   "--no-progress", "--overwrite", *flags]
            run_cli(cmd)
            m = json.loads((run / "metrics.json").read_text())
            per_seed.append(m)
            print(f"sweep: {name} seed {seed}: validation {m['validation']['accuracy']:.4f} "
                  f"test {m['test']['accuracy']:.4f} ({m['timings']['train_seconds']:.0f} s)", file=sys.stderr)
        mean = lambda key: sum(m[key]["accuracy"] for m in per_seed) / len(per_seed)  # noqa: E731
        rows.append({"config": name, "flags": " ".join(flags), "trainable": per_seed[0]["parameters"]["trainable"],
                     "validation_accuracy": round(mean("validation"), 4), "test_accuracy": round(mean("test"), 4),
                     "train_seconds": round(sum(m["timings"]["train_seconds"] for m in per_seed) / len(per_seed), 1),
                     "seeds": seeds, "backend": per_seed[0]["run"]["backend"], "device": per_seed[0]["run"]["device"]})
    best = max(rows, key=lambda r: r["validation_accuracy"])
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "scale": args.scale, "settings": s,
              "budget": args.budget, "rows": rows, "chosen_on_validation": best["config"]}
    write_result(result, out, f"sweep-{args.scale}")
    if args.write_docs:
        write_results_md(result, Path(args.write_docs), args)


def write_results_md(result: dict, path: Path, args) -> None:
    """The results table a person reads, with the command that reproduces every row."""
    s = result["settings"]
    lines = [
        f"## Sweep at {result['scale']} scale ({result['date']}, {result['machine']})", "",
        f"MiniLM (all-MiniLM-L6-v2), AG News from ../shared: first {s['train_rows'] or 'all but the last 10%'} rows of "
        f"train.csv for training, a disjoint slice of {s['validation_rows'] or '10%'} train rows for validation, "
        f"{s['test_rows'] or 'all 7,600'} rows of the official test set; {s['epochs']} epochs; seeds "
        f"{', '.join(map(str, result['rows'][0]['seeds']))} (mean). Budget {result['budget']:,} trainable parameters. "
        f"Backend `{result['rows'][0]['backend']}` on `{result['rows'][0]['device']}`.", "",
        "| config | trainable | validation acc | test acc | train time (s) | flags |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        mark = " **(chosen on validation)**" if r["config"] == result["chosen_on_validation"] else ""
        lines.append(f"| {r['config']}{mark} | {r['trainable']:,} | {100 * r['validation_accuracy']:.2f}% | "
                     f"{100 * r['test_accuracy']:.2f}% | {r['train_seconds']:.0f} | `{r['flags']}` |")
    lines += ["", "Reproduce: `python bench/sweep.py --scale " + result["scale"] + f" --seeds {args.seeds}`"
              + (f" --only {args.only}" if args.only else "") + ". Each row is one `loracls train` run per seed with "
              "the flags shown plus the data flags the script prints.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n\n"
    path.write_text(old.rstrip("\n") + "\n\n" + "\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
