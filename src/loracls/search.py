"""`loracls sweep`: the most accurate model under a trainable-parameter budget, searched with Optuna.

    loracls sweep --model M --train train.csv --test test.csv --budget 1000000 --trials 20 --output-dir sweeps/s

Each trial picks where the budget goes (target set, head, layers, method) and the recipe (lr, LoRA+ ratio,
alpha/r, classifier warm-up), then takes the largest rank that fits the budget times a sampled share of it
(plan.largest_rank, so every trial fits by construction; training checks it again).  Trials are normal run
directories under D/trials/; Optuna's TPE chooses the next trial from the finished ones, and a trial whose
per-epoch validation accuracy falls below the median of earlier trials at the same epoch is stopped early
(MedianPruner).  The choice is made on validation accuracy only; test accuracy is recorded, never used.

The study lives in an Optuna database, D/sweep.db (SQLite) by default: a killed sweep continues where it stopped
(finished trials are kept, a trial cut off by the kill is marked failed), and several processes or machines can
work on one sweep by pointing --storage at one database URL (Optuna's own distributed mode).  After every trial
D/leaderboard.json, D/leaderboard.md, D/leaderboard.png (validation accuracy against trainable parameters) and
the link D/best (the best trial's run directory) are rewritten.  A trial that fails on something the user can fix
(its data, a choice the model cannot take) is reported in one line, recorded as failed with its error, and the
sweep goes on.  `optuna` is an optional extra (loracls[sweep]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loracls.atomic import atomic_write_json, atomic_write_text
from loracls.config import HEAD_CHOICES, LORA_METHODS, METHOD_CHOICES, RunConfig
from loracls.errors import LoraclsError, TrainingInterrupted, first_line, machine_error_message
from loracls.families import TARGET_SETS
from loracls.models import model_config_of
from loracls.rundir import METRICS, absolute_path, model_name
from loracls.tasks import LOWER_IS_BETTER, sweep_metric, task_of

STUDY = "loracls-sweep"
FINISHED = ("COMPLETE", "PRUNED")
FINISHED_LOWER = tuple(s.lower() for s in FINISHED)  # as the leaderboard writes states
DEFAULT_TRIALS = 20
# Settings each trial chooses.  A caller may fix the first ones (every trial then uses the base config's value);
# the others follow from the budget and the sampled recipe, so a caller giving one is told rather than ignored.
FIXABLE = ("targets", "head", "method")
CHOSEN = ("rank", "alpha", "layers", "layer_ranks", "init", "lr", "lora_plus_ratio", "head_warmup_ratio")


@dataclass
class Space:
    """What a sweep searches.  A dimension with one value is fixed."""

    target_sets: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in TARGET_SETS.items()})
    """Name (as the leaderboard shows it) -> LoRA targets."""
    heads: list[str] | None = None
    """None: every head the model family defines."""
    layers: list[str] = field(default_factory=lambda: ["all", "top-half"])
    methods: list[str] = field(default_factory=lambda: list(LORA_METHODS))  # no full fine-tune: see narrow()
    rank_shares: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    alpha_over_rank: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    lr: tuple[float, float] = (1e-4, 3e-3)
    lora_plus_ratios: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    head_warmup_ratios: list[float] = field(default_factory=lambda: [0.0, 0.1])


@dataclass
class SweepResult:
    output_dir: Path
    best: dict
    """The leaderboard row of the best trial (by the validation `metric`), with its run directory.  A sweep that
    ends without one complete trial raises LoraclsError instead."""
    leaderboard: list[dict]
    metric: str = "accuracy"
    """The metric trials were chosen on (the task's score); rows hold it as validation_<metric>, test_<metric>."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LoraclsError("loracls sweep needs optuna; pip install 'loracls[sweep]'") from None
    # A failed trial is reported by the objective in one line; Optuna's own warning would repeat it (with a
    # traceback for Ctrl-C) and call the trial's value "not acceptable".
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def fixed_settings(given: Iterable[str]) -> list[str]:
    """Which of the settings a caller gave (config field names) fix a searched dimension; LoraclsError for one the
    sweep chooses itself."""
    given = list(given)
    chosen = next((k for k in CHOSEN if k in given), None)
    if chosen is not None:
        raise LoraclsError(f"the sweep chooses {chosen} itself for each trial"
                           f"{' to fit the budget' if chosen == 'rank' else ''}; drop --{chosen.replace('_', '-')}")
    return [k for k in FIXABLE if k in given]


def narrow(space: Space, base: RunConfig, fixed: Iterable[str]) -> Space:
    """`space` with each dimension named in `fixed` (see FIXABLE) reduced to the base config's one value."""
    fixed = set(fixed)
    unknown = fixed - set(FIXABLE)
    if unknown:
        raise LoraclsError(f"a sweep can fix only {', '.join(FIXABLE)}, not {', '.join(sorted(unknown))}")
    lora = base.lora
    if "method" in fixed and lora.full:
        raise LoraclsError("a sweep searches where LoRA goes within the budget, and --method full has no LoRA; "
                           "train the full fine-tune with loracls train")
    return dataclasses.replace(
        space,
        target_sets={",".join(lora.targets): list(lora.targets)} if "targets" in fixed else space.target_sets,
        heads=[lora.head] if "head" in fixed else space.heads,
        methods=[lora.method] if "method" in fixed else space.methods)


def sweep(base: RunConfig, *, budget: int, trials: int = DEFAULT_TRIALS, time_limit: float | None = None,
          output_dir: str | Path | None = None, seeds: list[int] | None = None, storage: str | None = None,
          space: Space | None = None, fixed: Iterable[str] = (), progress: bool = False,
          allow_pickle: bool = False, metric: str | None = None) -> SweepResult:
    """Run (or continue) a sweep until `trials` trials have finished or `time_limit` seconds have passed.

    base: the fixed part of every trial.  fixed: the settings among FIXABLE that every trial takes from `base`
    instead of searching them.  output_dir: None takes base.output_dir, else sweeps/<model>-<budget>.  metric:
    the validation metric trials are chosen on (any the task reports; None: the task's score), minimized where
    lower is better (loss, MSE, MAE, Hamming loss)."""
    from loracls import planning

    optuna = _optuna()
    if budget <= 0 or trials <= 0:
        raise LoraclsError("--budget and --trials must be positive")
    if not base.data.validation and base.data.validation_fraction <= 0:
        raise LoraclsError("a sweep picks on the validation split: give --validation or a --validation-fraction "
                           "above 0")
    out = absolute_path(output_dir or base.output_dir or f"sweeps/{model_name(base.model)}-{budget}")
    base = base.with_absolute_paths()
    seeds = seeds or [base.train.seed]
    space = narrow(space or Space(), base, fixed)
    model_config = model_config_of(base)  # trials build the model; the sweep only counts
    # the head's width: the task's outputs for the data's labels; the task as the data decide it (every trial's)
    num_labels, task_name = planning.labels_from_data(base, hub=True, allow_pickle=allow_pickle)
    base = base.with_overrides({"data.task": task_name})
    num_labels = task_of(base).outputs(num_labels)
    metric = sweep_metric(task_of(base), metric)
    # The budget, model, data and validation split are checked: only now does the sweep leave a folder behind.
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials").mkdir(exist_ok=True)
    url = storage or f"sqlite:///{out / 'sweep.db'}"
    # Each process seeds its sampler apart: a continued sweep, or a second worker on the same storage, must not
    # propose the trials already proposed.
    sampler_seed = hash((base.train.seed, socket.gethostname(), os.getpid(), time.time_ns())) % 2**31
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(study_name=STUDY, storage=_storage(optuna, url), direction=direction,
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    _check_same_search(study, base, space, budget, metric)
    _fail_dead_trials(optuna, study)

    def objective(trial) -> float:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        try:
            config = suggest(trial, base, space, model_config, num_labels, budget, out)
            return run_trial(trial, config, seeds, progress, allow_pickle, metric)
        except LoraclsError as e:  # this trial's choices (or its data) failed; the next trial may not
            print(f"loracls: trial {trial.number} failed: {e}", file=sys.stderr)
            trial.set_user_attr("error", str(e))
            return float("nan")  # Optuna records a NaN value as a failed trial

    teachers = teacher_rows(base.train.teacher or [], metric)

    def after_trial(study, trial) -> None:
        write_leaderboard(study, out, budget, metric, teachers)

    done = sum(t.state.name in FINISHED for t in study.trials)
    if done < trials:
        stop = optuna.study.MaxTrialsCallback(trials, states=tuple(getattr(optuna.trial.TrialState, s)
                                                                   for s in FINISHED))
        study.optimize(objective, n_trials=trials - done, timeout=time_limit, callbacks=[stop, after_trial])
    rows = write_leaderboard(study, out, budget, metric, teachers)
    best = next((r for r in rows if r["rank"] == 1), None)
    if best is None:
        raise LoraclsError(_why_nothing_finished(rows, out))
    return SweepResult(out, best, rows, metric)


def _why_nothing_finished(rows: list[dict], out: Path) -> str:
    """A sweep without one complete trial has no result to give: say why, and what to do."""
    failed = [r for r in rows if r["state"] == "fail" and r["error"]]
    if failed:
        return (f"no trial of the sweep in {out} completed: {len(failed)} failed, the last with: {failed[-1]['error']} "
                f"(each failure is in {out / 'leaderboard.md'}); run the same command again once that is fixed")
    return (f"no trial of the sweep in {out} completed (the others were pruned, or are still running elsewhere); "
            f"run the same command again, with more --trials or a longer --time-limit")


def _check_same_search(study, base: RunConfig, space: Space, budget: int, metric: str) -> None:
    """A study continues only the search it started (Optuna cannot change a dimension's choices midway)."""
    # Target sets by name (a fixed set is named after its targets): the record sweeps started with before the
    # sets were carried as data, so those continue.
    searched = dict(dataclasses.asdict(space), target_sets=list(space.target_sets))
    this = json.dumps({"model": base.model, "budget": budget, "space": searched}, sort_keys=True, default=str)
    first = study.user_attrs.get("search")
    if first is None:
        study.set_user_attr("search", this)
    elif first != this:
        raise LoraclsError("this sweep's database holds another search (model, budget or searched choices "
                           "differ); use a new --output-dir or --storage, or the same flags as before")
    chosen_on = study.user_attrs.get("metric", metric)  # sweeps started before --metric chose on the task's score
    if chosen_on != metric:
        raise LoraclsError(f"this sweep's trials were chosen on validation {chosen_on}, not {metric}; pass "
                           f"--metric {chosen_on} to continue it, or use a new --output-dir")
    study.set_user_attr("metric", metric)


def _storage(optuna, url: str):
    """An RDB storage with heartbeats, so a trial whose process died is noticed by the others."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental in Optuna
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
    except Exception as e:  # noqa: BLE001  a bad URL, an unreachable database server: any of the drivers' errors
        if machine_error_message(e) is not None:  # a full disk, a read-only folder: the CLI words those
            raise
        raise LoraclsError(f"cannot open the sweep database {url!r} ({type(e).__name__}: {first_line(e, 160)}); "
                           "check --storage") from None


def _fail_dead_trials(optuna, study) -> None:
    """Trials left RUNNING by a killed process of this host are failed now (other hosts' wait for heartbeats)."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid is not None and not _alive(int(pid)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


# With --teacher, the sweep also chooses the distillation weight and temperature among these.
DISTILL_ALPHAS = [0.3, 0.5, 0.7, 0.9]
DISTILL_TEMPERATURES = [1.0, 2.0, 4.0]


def suggest(trial, base: RunConfig, space: Space, model_config, num_labels: int, budget: int, out: Path) -> RunConfig:
    """The trial's RunConfig: its choices, and the largest rank within the budget times the sampled share."""
    from loracls import planning
    from loracls.families import family_of

    optuna = _optuna()
    fam = family_of(model_config)
    heads = space.heads or (list(HEAD_CHOICES) if fam is not None and fam.head else ["native"])
    n_layers = int(model_config.num_hidden_layers)
    targets = space.target_sets[trial.suggest_categorical("targets", list(space.target_sets))]
    layers = trial.suggest_categorical("layers", space.layers)
    lora = dataclasses.replace(
        base.lora, targets=targets, head=trial.suggest_categorical("head", heads),
        method=trial.suggest_categorical("method", space.methods), init="kaiming", layer_ranks=None,
        layers=None if layers == "all" or (fam is not None and fam.shared_layers) else
        list(range(n_layers // 2, n_layers)))
    try:
        top = planning.largest_rank(model_config, num_labels, lora, budget)
    except LoraclsError as e:  # even rank 1 does not fit with these choices
        raise optuna.TrialPruned(str(e)) from None
    rank = max(1, int(top * trial.suggest_categorical("rank_share", space.rank_shares)))
    lora = dataclasses.replace(lora, rank=rank, alpha=rank * trial.suggest_categorical("alpha_over_rank",
                                                                                      space.alpha_over_rank))
    plan = planning.count(model_config, num_labels, lora)
    trial.set_user_attr("trainable", plan.trainable)
    train = dataclasses.replace(
        base.train, lr=trial.suggest_float("lr", *space.lr, log=True),
        lora_plus_ratio=trial.suggest_categorical("lora_plus_ratio", space.lora_plus_ratios),
        head_warmup_ratio=trial.suggest_categorical("head_warmup_ratio", space.head_warmup_ratios))
    if base.train.teacher:  # a student: how much to learn from the teachers, and how softly
        train = dataclasses.replace(
            train, distill_alpha=trial.suggest_categorical("distill_alpha", DISTILL_ALPHAS),
            distill_temperature=trial.suggest_categorical("distill_temperature", DISTILL_TEMPERATURES))
    return dataclasses.replace(base, lora=lora, train=train, max_trainable=budget,
                               output_dir=str(out / "trials" / f"{trial.number:04d}"))


def run_trial(trial, config: RunConfig, seeds: list[int], progress: bool, allow_pickle: bool,
              metric: str = "accuracy") -> float:
    """Train the trial (once per seed); its value is the mean best validation `metric`.  The first seed's epochs
    are reported to the pruner."""
    from loracls.training import train

    optuna = _optuna()
    runs, val, test, seconds, pruned = [], [], [], 0.0, False

    def report(epoch: int, metrics: dict | None) -> bool:
        nonlocal pruned
        trial.report(metrics[metric] if metrics else 0.0, epoch)
        pruned = epoch < config.train.epochs and trial.should_prune()  # stopping after the last epoch saves nothing
        return pruned

    for i, seed in enumerate(seeds):
        cfg = config if len(seeds) == 1 else dataclasses.replace(
            config, output_dir=f"{config.output_dir}-seed{seed}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        try:
            run = train(cfg, overwrite=True, allow_pickle=allow_pickle, progress=progress,
                        on_epoch=report if i == 0 else None)
        except TrainingInterrupted:
            raise KeyboardInterrupt from None  # the sweep stops; rerunning its command continues it
        m = json.loads((run.path / METRICS).read_text())
        runs.append(str(run.path))
        val.append(m["validation"][metric])  # sweep() requires a validation split
        test.append(m["test"][metric] if m["test"] else None)
        seconds += m["timings"]["total_seconds"]
        if pruned:
            break
    trial.set_user_attr("runs", runs)
    trial.set_user_attr(f"test_{metric}", statistics.mean(test) if None not in test else None)
    trial.set_user_attr("seconds", round(seconds, 1))
    trial.set_user_attr("config", {"lora": dataclasses.asdict(config.lora), "lr": config.train.lr,
                                   "lora_plus_ratio": config.train.lora_plus_ratio,
                                   "head_warmup_ratio": config.train.head_warmup_ratio})
    value = statistics.mean(val)
    if pruned:
        trial.set_user_attr(f"validation_{metric}", value)
        raise optuna.TrialPruned(f"validation {metric} {value:.4f} below the median at this epoch")
    return value


def leaderboard_rows(study, metric: str = "accuracy") -> list[dict]:
    val_key, test_key = f"validation_{metric}", f"test_{metric}"
    rows = []
    for t in study.trials:
        if t.state.name not in FINISHED + ("RUNNING", "FAIL"):
            continue
        val = t.value if t.state.name == "COMPLETE" else t.user_attrs.get(val_key)
        rows.append({"trial": t.number, "state": t.state.name.lower(), val_key: val,
                     test_key: t.user_attrs.get(test_key), "trainable": t.user_attrs.get("trainable"),
                     "seconds": t.user_attrs.get("seconds"), "params": t.params,
                     "config": t.user_attrs.get("config"), "runs": t.user_attrs.get("runs", []),
                     "error": t.user_attrs.get("error")})
    sign = 1 if metric in LOWER_IS_BETTER else -1
    ranked = sorted((r for r in rows if r["state"] == "complete" and r[val_key] is not None),
                    key=lambda r: sign * r[val_key])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    for r in rows:
        r.setdefault("rank", None)
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["trial"]))


def teacher_rows(runs: list[str], metric: str) -> list[dict]:
    """The teachers of a students' sweep as the leaderboard shows them beside the trials: each run's method,
    trainable parameters and own validation and test `metric` (a full fine-tune is the budget's reference)."""
    rows = []
    for path in runs:
        try:
            m = json.loads((Path(path) / METRICS).read_text())
        except (OSError, ValueError):
            m = {}  # checked before the first trial; read for the figures alone
        figure = {split: (m.get(split) or {}).get(metric) for split in ("validation", "test")}
        rows.append({"run": str(path), "method": (m.get("run") or {}).get("method"),
                     "trainable": (m.get("parameters") or {}).get("trainable"),
                     f"validation_{metric}": figure["validation"], f"test_{metric}": figure["test"]})
    return rows


def write_leaderboard(study, out: Path, budget: int, metric: str = "accuracy",
                      teachers: list[dict] = ()) -> list[dict]:
    rows = leaderboard_rows(study, metric)
    atomic_write_json(out / "leaderboard.json", {"budget": budget, "metric": metric, "trials": rows,
                                                 "teachers": list(teachers)})
    atomic_write_text(out / "leaderboard.md", leaderboard_markdown(rows, budget, metric, teachers))
    plot_leaderboard(rows, out / "leaderboard.png", budget, metric)
    best = next((r for r in rows if r["rank"] == 1), None)
    if best and best["runs"]:
        link = out / "best"
        tmp = out / f".best.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(best["runs"][0], out))
        os.replace(tmp, link)  # atomic: the link always points at a complete run
    return rows


def leaderboard_markdown(rows: list[dict], budget: int, metric: str = "accuracy", teachers: list[dict] = ()) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%" if metric == "accuracy" else f"{x:.4f}"

    distill = ["distill alpha", "T"] if teachers else []  # what a students' sweep searches besides the rest
    header = ["#", "trial", "state", "validation", "test", "trainable", "targets", "rank", "head", "layers", "method",
              "lr", "LoRA+", "alpha/r", "head warm-up", *distill, "seconds"]
    left = {"state", "targets", "head", "layers", "method"}
    lines = [f"# Sweep leaderboard (budget {budget:,} trainable parameters)", "",
             f"Chosen on validation {metric}; test {metric} is shown, never used.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" if h in left else "---:" for h in header) + "|"]
    for r in rows:
        p, c = r["params"], r["config"] or {}
        lora = c.get("lora", {})
        cells = [r["rank"] or "", r["trial"], r["state"], pct(r[f"validation_{metric}"]), pct(r[f"test_{metric}"]),
                 f"{r['trainable'] or 0:,}", p.get("targets", ""), lora.get("rank", ""), p.get("head", ""),
                 p.get("layers", ""), p.get("method", ""), f"{p.get('lr', 0):.2e}", p.get("lora_plus_ratio", ""),
                 p.get("alpha_over_rank", ""), p.get("head_warmup_ratio", ""),
                 *(p.get(k, "") for k in ("distill_alpha", "distill_temperature") if teachers), r["seconds"] or ""]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if teachers:
        lines += ["", "Every trial is a student of these teachers; a full fine-tune is what the budget is read "
                  "against.", "",
                  f"| teacher | method | trainable | validation {metric} | test {metric} |", "|---|---|---:|---:|---:|"]
        for t in teachers:
            method = "full fine-tune" if t["method"] == "full" else t["method"] or "n/a"
            lines.append(f"| {t['run']} | {method} | {t['trainable'] or 0:,} | {pct(t[f'validation_{metric}'])} | "
                         f"{pct(t[f'test_{metric}'])} |")
    return "\n".join(lines) + "\n"


def plot_leaderboard(rows: list[dict], path: Path, budget: int, metric: str = "accuracy") -> None:
    from loracls.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for method, marker in zip(METHOD_CHOICES, "os^D"):
            pts = [(r["trainable"], r[f"validation_{metric}"]) for r in rows if r["params"].get("method") == method
                   and r["trainable"] and r[f"validation_{metric}"] is not None and r["state"] in FINISHED_LOWER]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=method, alpha=0.8)
        ax.axvline(budget, color="gray", linestyle="--", label="budget")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"sweep: validation {metric} against trainable parameters")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        _save(fig, path, 110)
    finally:
        plt.close(fig)


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise LoraclsError(f"--seeds {text!r} is not a comma list of whole numbers >= 0, e.g. 42,43,44")
    return seeds


def print_summary(result: SweepResult) -> None:
    best, metric = result.best, result.metric
    print(f"sweep directory: {result.output_dir}")
    print(f"best trial {best['trial']}: validation {metric} {best[f'validation_{metric}']:.4f}"
          + (f", test {best[f'test_{metric}']:.4f}" if best[f"test_{metric}"] is not None else "")
          + f", {best['trainable']:,} trainable parameters; run: {best['runs'][0]}")
    print(f"leaderboard: {result.output_dir / 'leaderboard.md'}")

