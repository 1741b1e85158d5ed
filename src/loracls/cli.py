"""The `loracls` command: train, sweep, evaluate, predict, export, plan, serve.

The flags of `train` and `sweep` are generated from the config dataclasses (loracls.config): each field becomes a
flag with its name, type, choices and help (the field's docstring and default).  A flag overrides the config file
field by field.  `evaluate`, `predict`, `export` and `plan` take the config fields they use the same way (--device,
--threads, --batch-size, --text-columns, --label-column, the LoRA flags); their other flags (--backend, which adds
ONNX Runtime to the training backends, --format, ...) take their choices from the modules that implement them.
Each command is a thin layer over the Python API (loracls.api), which resolves what the flags leave open
(`--rank auto`, a sweep's fixed dimensions).

A LoraclsError, or an error the machine caused (disk full, read-only, permission denied, whichever library was
writing; see errors.machine_error_message), becomes one line on stderr and exit code 2.  An interrupted command
exits 130: Ctrl-C and SIGTERM both interrupt, and every command cleans up what it had half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading

from loracls import api
from loracls.config import SECTIONS, DataSettings, LoraSettings, RunConfig, TrainSettings, field_default, field_docs
from loracls.errors import LoraclsError, TrainingInterrupted, machine_error_message
from loracls.rundir import REPORT

# Flags `train --resume` accepts: they change how the run is carried out, never what it computes.
RESUME_FLAGS = ("threads",)
# The LoRA settings `plan` counts (method full: every parameter, whatever the others say).
PLAN_FIELDS = ("rank", "alpha", "targets", "layers", "head", "rslora", "method")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not usage + error) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _rank(text: str):
    return text if text == "auto" else int(text)


def _flag_type(f: dataclasses.Field):
    kind = str(f.type)
    if f.name == "rank":
        return _rank
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def add_field(group, cls, name: str, *, flag: str | None = None, help_default: str | None = None,
              dest: str | None = None, **overrides) -> str:
    """Add the flag of config field `cls.name`; returns its dest.  The default is None (the config's value is
    kept), and the help shows the field's docstring and its default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    doc = field_docs(cls).get(name, "")
    default = field_default(f)
    shown = help_default if help_default is not None else (
        ",".join(map(str, default)) if isinstance(default, list) else default)
    kw = {"dest": dest or name, "default": None, "help": f"{doc} (default: {shown})".replace("%", "%%")}
    if "bool" in str(f.type):
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = _flag_type(f)
        kw["metavar"] = name.upper() if "choices" not in f.metadata else None
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
    if name == "rank":
        kw["help"] = kw["help"].replace(". (default", "; or 'auto' with --budget: the largest rank that fits (default")
    kw.update(overrides)
    group.add_argument(flag or "--" + name.replace("_", "-"), **kw)
    return kw["dest"]


# The dests of the flags generated from config fields: each is the field's name, which is also the keyword the
# Python API takes for it.  Filled as the train flags are generated.
CONFIG_FLAGS: set[str] = set()


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    titles = {None: "model and run", "lora": "LoRA", "data": "data", "train": "optimization"}
    for section, cls in [(None, RunConfig), *SECTIONS.items()]:
        group = p.add_argument_group(titles[section])
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS and cls is RunConfig:
                continue
            CONFIG_FLAGS.add(add_field(group, cls, f.name))


def _config_overrides(args) -> dict:
    """The config fields given on the command line, as API keywords."""
    return {k: v for k, v in vars(args).items() if k in CONFIG_FLAGS and v is not None}


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by evaluate and predict: how to run, and how to read the data when it differs from training."""
    from loracls.predictor import INFERENCE_BACKENDS

    p.add_argument("--backend", choices=INFERENCE_BACKENDS, default="auto",
                   help="fast and peft as in training (any reads any run); onnx / onnx-int8 serve through ONNX "
                        "Runtime, exported into the run on first use (needs loracls[onnx]) (default: auto)")
    add_field(p, RunConfig, "device", help_default="auto")
    add_field(p, RunConfig, "precision", help_default="the run's")
    add_field(p, RunConfig, "threads", type=positive_int)
    add_field(p, TrainSettings, "eval_batch_size", flag="--batch-size", dest="batch_size", type=positive_int,
              help_default="the run's eval_batch_size; the results do not depend on it")
    add_field(p, DataSettings, "text_columns", help_default="the run's")
    add_field(p, DataSettings, "text_pair_columns", help_default="the run's")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled data (trusted files only)")


def build_parser() -> argparse.ArgumentParser:
    from loracls._version import __version__
    from loracls.onnx_export import QUANTIZE_CHOICES
    from loracls.prediction_files import FORMATS
    from loracls.search import DEFAULT_TRIALS

    parser = _Parser(prog="loracls", description="Fine-tune transformer encoders for text classification with LoRA, "
                                                 "under a trainable-parameter budget.")
    parser.add_argument("--version", action="version", version=f"loracls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="fine-tune a model and write a run directory",
                       description="Fine-tune with LoRA.  Flags override --config field by field; without --config "
                                   "the defaults are the reference recipe (configs/agnews-roberta-base.yaml).")
    p.add_argument("--config", help="YAML config file (see configs/); its keys mirror these flags")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint "
                                                       "with the run's saved config (only --threads may be added)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir (only "
                                                            "loracls' own files are removed)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pickled data (.pkl); unpickling runs code from the file, so trust it first")
    p.add_argument("--budget", type=positive_int, help="with --rank auto: the largest rank whose trainable count "
                                                       "fits; also sets --max-trainable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)

    p = sub.add_parser("sweep", help="search for the most accurate model under a trainable-parameter budget",
                       description="Search targets, rank, head, layers, method and recipe with Optuna (TPE, with "
                                   "pruning on validation accuracy) within --budget trainable parameters; pick on "
                                   "validation only.  Each trial is a run directory under OUTPUT_DIR/trials/; "
                                   "rerunning the command continues a killed sweep.  Other flags set the fixed part "
                                   "of every trial (model, data, epochs, ...); --targets, --head and --method fix "
                                   "those dimensions (e.g. --method lora searches LoRA only); the rank, alpha, "
                                   "layers, lr, LoRA+ ratio and head warm-up are the sweep's to choose.")
    p.add_argument("--config", help="YAML config for the fixed part of every trial; its targets, head and method "
                                    "are still searched (give them as flags to fix them) and the values the sweep "
                                    "chooses (rank, alpha, layers, lr, ...) are replaced")
    p.add_argument("--budget", type=positive_int, required=True, help="most trainable parameters a trial may have")
    p.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS,
                   help=f"finished trials to reach (default: {DEFAULT_TRIALS})")
    p.add_argument("--time-limit", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--seeds", help="comma-separated seeds: each trial trains once per seed, scored on the mean")
    p.add_argument("--metric", help="the validation metric trials are chosen on, any the task reports (e.g. "
                                    "macro_f1, samples_f1, pearson, loss; lower is better for loss, mse, mae and "
                                    "hamming_loss) (default: the task's: accuracy, micro_f1 or spearman)")
    p.add_argument("--storage", help="Optuna database URL shared by several sweep processes (default: "
                                     "sqlite in OUTPUT_DIR)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled data (trusted files only)")
    _add_config_flags(p)

    p = sub.add_parser("evaluate", help="metrics of a run on labelled data",
                       description="Evaluate a run's best model on labelled data and print the metrics.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    p.add_argument("--data", required=True, help="labelled data (file or hub dataset); labels map as in training")
    p.add_argument("--max-samples", type=positive_int, help="use only the first N rows")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    add_field(p, DataSettings, "label_column", help_default="the run's")
    _add_inference_flags(p)

    p = sub.add_parser("predict", help="predict labels for new data",
                       description="Predict every row of --input, in order.  A label column, if any, is ignored.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    p.add_argument("--input", required=True, help="data to predict (CSV/TSV/JSONL/Parquet or hub dataset)")
    p.add_argument("--output", required=True, help="file to write (never the input or a file of the run)")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl: {id, label, label_id, probs} per row; csv: id,label,label_id,prob_<class>...; "
                        "kaggle: ID,Label with ID the 0-based row and Label the 0-based class index")
    _add_inference_flags(p)

    p = sub.add_parser("export", help="write a merged transformers or ONNX model folder",
                       description="Merge LoRA into the weights and write a folder that "
                                   "AutoModelForSequenceClassification and pipeline() load without loracls or peft "
                                   "(--format transformers), or that onnxruntime and optimum serve (--format onnx).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--format", choices=api.EXPORT_FORMATS, default=api.EXPORT_FORMATS[0],
                   help=f"(default: {api.EXPORT_FORMATS[0]})")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="with --format onnx: ONNX Runtime's dynamic int8")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output (a folder "
                                                            "holding anything else is never touched)")
    add_field(p, RunConfig, "threads", type=positive_int)

    p = sub.add_parser("plan", help="exact trainable-parameter count, from the model config alone",
                       description="Count trainable parameters without loading weights (a folder with only "
                                   "config.json works).  With --budget, list every configuration that fits.")
    add_field(p, RunConfig, "model", help_default="the --config's model")
    p.add_argument("--num-labels", type=positive_int, help="number of classes (default: from --config's local "
                                                            f"training data, else {api.DEFAULT_NUM_LABELS})")
    p.add_argument("--config", help="YAML config: count its model and LoRA settings")
    p.add_argument("--budget", type=positive_int, help="list the configurations with at most this many trainable "
                                                       "parameters")
    p.add_argument("--limit", type=positive_int, default=30, help="with --budget, how many configurations to list")
    g = p.add_argument_group("LoRA")
    for name in PLAN_FIELDS:
        add_field(g, LoraSettings, name)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    """`serve`'s flags are generated from loracls.server.ServerSettings (imported without starlette/uvicorn)."""
    from loracls.server import ServerSettings

    p = sub.add_parser("serve", help="serve a run over HTTP (Text Embeddings Inference's /predict protocol)",
                       description="Serve a run's classifier over HTTP until SIGTERM or Ctrl-C, with dynamic "
                                   "batching: POST /predict and / (TEI's protocol; huggingface_hub's "
                                   "InferenceClient works), GET /health, /info and /metrics (Prometheus).  Needs "
                                   "loracls[serve].")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    for f in dataclasses.fields(ServerSettings):
        positive = str(f.type).startswith("int") and f.name != "port"
        add_field(p, ServerSettings, f.name, **({"type": positive_int} if positive else {}))
    add_field(p, RunConfig, "device", help_default="auto")
    add_field(p, RunConfig, "threads", type=positive_int)


# -----------------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in _config_overrides(args) if k not in RESUME_FLAGS]
        given += [flag for flag, on in (("--config", args.config), ("--budget", args.budget),
                                         ("--overwrite", args.overwrite)) if on]
        if given:
            raise LoraclsError(f"--resume uses the run's saved config; drop {', '.join(given)}")
        result = api.resume(args.resume, allow_pickle=args.allow_pickle, progress=not args.no_progress,
                            threads=args.threads)
    else:
        result = api.train(args.config, budget=args.budget, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                           progress=not args.no_progress, **_config_overrides(args))
    metrics = result.metrics
    if metrics is None:  # a torchrun rank other than 0: rank 0 prints
        return 0
    from loracls.tasks import get_task

    task = get_task(metrics["run"].get("task"))
    print(f"run directory: {result.run_dir}")
    for split in ("validation", "test"):
        m = metrics.get(split)
        if m:
            print(f"{split}: {task.summary(m)}  ({m['num_examples']} examples)")
    p, tm = metrics["parameters"], metrics["timings"]
    print(f"trainable parameters: {p['trainable']:,} ({p['percent']:.3f}%)  |  train time {tm['train_seconds']:.1f} s"
          f"  |  {metrics['throughput']['train_samples_per_second']:.1f} samples/s  |  "
          f"report: {result.run_dir / REPORT}")
    return 0


def _predictor(args):
    from loracls.predictor import open_predictor

    return open_predictor(args.run_dir, backend=args.backend, device=args.device or "auto",
                          batch_size=args.batch_size, threads=args.threads, precision=args.precision)


def cmd_evaluate(args) -> int:
    from loracls.prediction_files import evaluate_file
    from loracls.predictor import is_main

    predictor = _predictor(args)
    m = evaluate_file(predictor, args.data, max_samples=args.max_samples, allow_pickle=args.allow_pickle,
                      text_columns=args.text_columns, text_pair_columns=args.text_pair_columns,
                      label_column=args.label_column)
    if not is_main():
        return 0
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print("\n".join(predictor.task.console_lines(m, predictor.label_map.names)))
    return 0


def cmd_predict(args) -> int:
    from loracls.prediction_files import check_output, predict_file
    from loracls.predictor import is_main

    check_output(args.run_dir, args.input, args.output)  # before the model loads: the cheap refusal first
    n = predict_file(_predictor(args), args.input, args.output, args.format, allow_pickle=args.allow_pickle,
                     text_columns=args.text_columns, text_pair_columns=args.text_pair_columns)
    if is_main():
        print(f"wrote {n} predictions to {args.output} ({args.format})")
    return 0


def cmd_export(args) -> int:
    from loracls.api import export
    from loracls.build import use_threads

    use_threads(args.threads)
    out = export(args.run_dir, args.output, format=args.format, quantize=args.quantize, overwrite=args.overwrite)
    what = "ONNX model" + (f" ({args.quantize})" if args.quantize else "") if args.format == "onnx" \
        else "transformers model"
    print(f"exported a merged {what} to {out}")
    return 0


def cmd_plan(args) -> int:
    from loracls import planning

    lora = {k: getattr(args, k) for k in PLAN_FIELDS}
    config, model_config, num_labels = api.plan_inputs(args.model, args.num_labels, config=args.config,
                                                       budget=args.budget, **lora)
    enumerate_all = args.budget is not None and args.rank is None and not args.targets
    print(planning.describe(config, model_config, num_labels, budget=args.budget, enumerate_all=enumerate_all,
                            limit=args.limit))
    return 0


def cmd_sweep(args) -> int:
    from loracls.search import parse_seeds, print_summary

    try:
        result = api.sweep(args.config, budget=args.budget, trials=args.trials, time_limit=args.time_limit,
                           seeds=parse_seeds(args.seeds), storage=args.storage, allow_pickle=args.allow_pickle,
                           metric=args.metric, **_config_overrides(args))
    except KeyboardInterrupt:
        print("loracls: sweep interrupted; run the same command again to continue it", file=sys.stderr)
        return 130
    print_summary(result)
    return 0


def cmd_serve(args) -> int:
    from loracls.server import ServerSettings

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)
                if getattr(args, f.name) is not None}
    api.serve(args.run_dir, device=args.device or "auto", threads=args.threads, **settings)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export,
            "plan": cmd_plan, "sweep": cmd_sweep, "serve": cmd_serve}


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# Whether _interrupt's look-again timer may still be pending: main() cancels only that one, never a timer of a
# program that embeds loracls.
_alarm_armed = False


def _interrupt(signum, frame):
    """SIGTERM and Ctrl-C unwind as KeyboardInterrupt, so every command's cleanup runs.  Not in the middle of an
    import, though: raised inside a C extension's initialisation (torch's), it aborts the process, or leaves the
    interpreter marked as killed by SIGINT however the exception is handled.  Then it waits until the import is
    over, looking again every 50 ms."""
    global _alarm_armed
    if _importing(frame):
        signal.signal(signal.SIGALRM, _interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        _alarm_armed = True
        return
    if signum == signal.SIGALRM:  # the one-shot timer fired: nothing is left to cancel
        _alarm_armed = False
    raise KeyboardInterrupt


def _handlers() -> dict:
    """The handlers main() replaces: SIGTERM's and SIGINT's when they are Python's defaults (not under a caller
    that installed its own, and only in the main thread, where signals are delivered)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    return {sig: h for sig, h in defaults.items() if signal.getsignal(sig) is h}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0, 2 for a user's mistake, 130 when interrupted)."""
    global _alarm_armed
    previous = _handlers()
    alarm = signal.getsignal(signal.SIGALRM)  # _interrupt takes SIGALRM over to look again after an import
    for sig in previous:
        signal.signal(sig, _interrupt)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("loracls: interrupted", file=sys.stderr)
        return 130
    finally:
        if _alarm_armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _alarm_armed = False
        if signal.getsignal(signal.SIGALRM) is _interrupt and alarm is not _interrupt:
            signal.signal(signal.SIGALRM, alarm if alarm is not None else signal.SIG_DFL)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if "loracls.distributed" in sys.modules:  # leave a torchrun job's process group cleanly
            sys.modules["loracls.distributed"].shutdown()


def _run(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (one line, exit 2)
        return e.code
    previous_hook = threading.excepthook
    threading.excepthook = _thread_hook(previous_hook)
    try:
        with api.quiet_libraries(), api.command_line():  # no library bars or load reports, in every command
            return COMMANDS[args.command](args)
    except LoraclsError as e:
        print(f"loracls {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        from loracls.predictor import is_main

        if is_main():
            print(f"loracls: {e}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  whichever library was writing when the disk filled
        message = machine_error_message(e)
        if message is None:
            raise
        print(f"loracls {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        threading.excepthook = previous_hook


def _thread_hook(previous):
    """A library's writer thread (TensorBoard's) that hits a full disk would print its traceback; the command's
    own thread meets the same error at its next write or flush and reports it in one line, so this stays quiet."""
    def hook(args):
        if machine_error_message(args.exc_value) is None:
            previous(args)
    return hook


if __name__ == "__main__":
    raise SystemExit(main())
