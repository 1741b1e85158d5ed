"""The `loracls` command: train, evaluate, predict, export, plan.

Flags override the config file field by field (see loracls.config for every default and its meaning).  A
LoraclsError becomes one line on stderr and exit code 2; an interrupted training exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from loracls.errors import LoraclsError

# flag dest -> dotted RunConfig field it overrides
TRAIN_OVERRIDES = {
    "model": "model", "backend": "backend", "device": "device", "output_dir": "output_dir",
    "max_trainable": "max_trainable", "trust_remote_code": "trust_remote_code",
    "train": "data.train", "validation": "data.validation", "test": "data.test",
    "text_columns": "data.text_columns", "label_column": "data.label_column",
    "validation_fraction": "data.validation_fraction", "max_train_samples": "data.max_train_samples",
    "max_eval_samples": "data.max_eval_samples", "max_length": "data.max_length",
    "rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout", "targets": "lora.targets",
    "layers": "lora.layers", "rslora": "lora.rslora", "head": "lora.head",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "lora_plus_ratio": "train.lora_plus_ratio", "weight_decay": "train.weight_decay", "schedule": "train.schedule",
    "warmup_ratio": "train.warmup_ratio", "label_smoothing": "train.label_smoothing",
    "early_stopping_patience": "train.early_stopping_patience", "seed": "train.seed",
    "save_every_steps": "train.save_every_steps", "eval_batch_size": "train.eval_batch_size",
    "log_every": "train.log_every",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not usage + error) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _rank(value: str):
    return value if value == "auto" else int(value)


def _add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=_rank, help="LoRA rank r (default 6), or 'auto' with --budget: the largest that fits")
    g.add_argument("--alpha", type=float, help="LoRA alpha; updates are scaled by alpha/r (default 24)")
    g.add_argument("--targets", help="comma-separated linear layers to adapt: query,key,value,attention.output.dense,"
                                     "intermediate.dense,output.dense (aliases q,k,v,attn_out,ffn_in,ffn_out)")
    g.add_argument("--layers", help="comma-separated encoder layer indices to adapt (default: all)")
    g.add_argument("--head", choices=["native", "linear", "native-lora"],
                   help="classification head: native (default), linear (final projection only), "
                        "native-lora (LoRA on the head's dense layer)")
    g.add_argument("--rslora", action="store_const", const=True, help="scale by alpha/sqrt(r) (rank-stabilized LoRA)")


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by evaluate and predict."""
    p.add_argument("--backend", choices=["auto", "fast", "peft"], default="auto", help="backend for inference")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled data (trusted files only)")
    p.add_argument("--batch-size", type=int,
                   help="examples per forward pass (default: the run's eval_batch_size); results do not depend on it")


def _inference_batch_size(args) -> int | None:
    if args.batch_size is not None and args.batch_size <= 0:
        raise LoraclsError(f"--batch-size must be a positive integer, got {args.batch_size}")
    return args.batch_size


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loracls", description="Fine-tune transformer encoders for text classification with LoRA, "
                                                 "under a trainable-parameter budget.")
    from loracls import __version__

    parser.add_argument("--version", action="version", version=f"loracls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # -- train --------------------------------------------------------------------------------------------------
    p = sub.add_parser("train", help="fine-tune a model and write a run directory",
                       description="Fine-tune with LoRA.  Flags override --config; without --config the defaults are "
                                   "the reference recipe (configs/agnews-roberta-base.yaml).")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint "
                                                       "(uses the run's saved config; other flags are not allowed)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pickled data (.pkl); unpickling runs code from the file, so trust it first")
    g = p.add_argument_group("model and run")
    g.add_argument("--model", help="Hugging Face model id or local model folder (default FacebookAI/roberta-base)")
    g.add_argument("--backend", choices=["auto", "fast", "peft"],
                   help="fast: loracls' packed encoder (BERT family); peft: transformers + PEFT; auto (default): fast "
                        "where supported")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    g.add_argument("--output-dir", help="run directory to create (default runs/<model>-<time>)")
    g.add_argument("--max-trainable", type=int, help="refuse to start if trainable parameters exceed this")
    g.add_argument("--budget", type=int, help="with --rank auto: pick the largest rank whose trainable count fits; "
                                              "also sets --max-trainable")
    g.add_argument("--trust-remote-code", action="store_const", const=True,
                   help="allow model code from the hub (off by default)")
    g = p.add_argument_group("data")
    g.add_argument("--train", help="training data: CSV/TSV/JSONL/Parquet file or hub dataset (name[:split])")
    g.add_argument("--validation", help="validation data (default: --validation-fraction of train, seeded)")
    g.add_argument("--test", help="test data, evaluated once at the end with the best epoch")
    g.add_argument("--text-columns", help="comma-separated text columns, joined with a space (default: detected)")
    g.add_argument("--label-column", help="label column (default: detected)")
    g.add_argument("--validation-fraction", type=float, help="share of train held out when no --validation (0.1)")
    g.add_argument("--max-train-samples", type=int, help="use only the first N training rows (before the hold-out)")
    g.add_argument("--max-eval-samples", type=int, help="use only the first N validation and test rows")
    g.add_argument("--max-length", type=int, help="truncate inputs to N tokens (default 256)")
    _add_lora_flags(p)
    p.add_argument("--dropout", type=float, help="dropout on the LoRA input (default 0.1)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="passes over the training set (default 3)")
    g.add_argument("--batch-size", type=int, help="examples per optimizer step (default 16)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-4)")
    g.add_argument("--lora-plus-ratio", type=float, help="LoRA+: lr of the B matrices = lr * ratio (default 1)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], help="lr decay after warmup (linear)")
    g.add_argument("--warmup-ratio", type=float, help="share of steps for linear warmup (default 0.1)")
    g.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    g.add_argument("--early-stopping-patience", type=int, help="stop after N epochs without better validation")
    g.add_argument("--seed", type=int, help="seed for the split, data order, init and dropout (default 42)")
    g.add_argument("--save-every-steps", type=int, help="also checkpoint every N steps (always at epoch ends)")
    g.add_argument("--eval-batch-size", type=int, help="batch size for evaluation (default 64)")
    g.add_argument("--log-every", type=int, help="log loss and lr every N steps (default 50)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    # -- evaluate -----------------------------------------------------------------------------------------------
    p = sub.add_parser("evaluate", help="metrics of a run on labelled data",
                       description="Evaluate a run's best model on labelled data and print the metrics.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    p.add_argument("--data", required=True, help="labelled data (file or hub dataset), same columns as training")
    p.add_argument("--max-samples", type=int, help="use only the first N rows")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    _add_inference_flags(p)

    # -- predict ------------------------------------------------------------------------------------------------
    p = sub.add_parser("predict", help="predict labels for new data",
                       description="Predict every row of --input.  A label column, if any, is ignored.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    p.add_argument("--input", required=True, help="data to predict (CSV/TSV/JSONL/Parquet or hub dataset)")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--format", choices=["csv", "jsonl", "kaggle"], default="jsonl",
                   help="jsonl: {id, label, label_id, probs} per row; csv: id,label,label_id,prob_<class>...; "
                        "kaggle: ID,Label with ID the 0-based row and Label the 0-based class index")
    _add_inference_flags(p)

    # -- export -------------------------------------------------------------------------------------------------
    p = sub.add_parser("export", help="write a merged plain transformers model folder",
                       description="Merge LoRA into the weights and write a folder that "
                                   "AutoModelForSequenceClassification and pipeline() load without loracls or peft.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loracls train`")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")

    # -- plan ---------------------------------------------------------------------------------------------------
    p = sub.add_parser("plan", help="exact trainable-parameter count, from the model config alone",
                       description="Count trainable parameters without loading weights (a folder with only "
                                   "config.json works).  With --budget, list every configuration that fits.")
    p.add_argument("--model", help="Hugging Face model id or local folder (only config.json is read)")
    p.add_argument("--num-labels", type=int, help="number of classes (default: 4, or from --config's data)")
    p.add_argument("--config", help="YAML config: count its model and LoRA settings")
    p.add_argument("--budget", type=int, help="list the configurations with at most this many trainable parameters")
    p.add_argument("--limit", type=int, default=30, help="with --budget, how many configurations to list")
    _add_lora_flags(p)
    return parser


# -----------------------------------------------------------------------------------------------------------------
def _config_from_args(args):
    from loracls.config import RunConfig, load_config

    config = load_config(args.config) if args.config else RunConfig()
    overrides = {TRAIN_OVERRIDES[k]: v for k, v in vars(args).items() if k in TRAIN_OVERRIDES and v is not None}
    rank = overrides.pop("lora.rank", None)
    if rank is not None and rank != "auto":
        overrides["lora.rank"] = rank
    config = config.with_overrides(overrides)
    budget = getattr(args, "budget", None)
    if rank == "auto":
        if budget is None:
            raise LoraclsError("--rank auto needs --budget N (the trainable-parameter budget)")
        from loracls import plan as planning
        from loracls.models import resolve_model_dir

        model_config = planning.read_model_config(resolve_model_dir(config.model, need_weights=False),
                                                  config.trust_remote_code)
        num_labels = getattr(args, "num_labels", None) or _num_labels_hint(config)
        best = planning.largest_rank(model_config, num_labels, config.lora, budget)
        config = config.with_overrides({"lora.rank": best})
        print(f"loracls: --rank auto picked r={best} (budget {budget:,})", file=sys.stderr)
    if budget is not None and config.max_trainable is None:
        config = config.with_overrides({"max_trainable": budget})
    return config


def _num_labels_hint(config) -> int:
    """Classes of the training data (read cheaply) for planning, or 4 when there is no local data."""
    from loracls.data import read_examples

    if config.data.train:
        _, names = read_examples(config.data.train, text_columns=config.data.text_columns,
                                 label_column=config.data.label_column)
        return len(names)
    return 4


def cmd_train(args) -> int:
    from loracls.train import resume, train

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                 if k in TRAIN_OVERRIDES and v is not None] + (["--config"] if args.config else [])
        if given:
            raise LoraclsError(f"--resume uses the run's saved config; drop {', '.join(given)}")
        run = resume(args.resume, allow_pickle=args.allow_pickle, progress=not args.no_progress)
    else:
        run = train(_config_from_args(args), overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                    progress=not args.no_progress)
    metrics = json.loads((run.path / "metrics.json").read_text())
    print(f"run directory: {run.path}")
    for split in ("validation", "test"):
        m = metrics.get(split)
        if m:
            print(f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({m['num_examples']} examples)")
    p, tm = metrics["parameters"], metrics["timings"]
    print(f"trainable parameters: {p['trainable']:,} ({p['percent']:.3f}%)  |  train time {tm['train_seconds']:.1f} s"
          f"  |  {metrics['throughput']['train_samples_per_second']:.1f} samples/s  |  report: {run.path / 'report.md'}")
    return 0


def cmd_evaluate(args) -> int:
    from loracls.evaluate import load_run
    from loracls.predict import evaluate_run

    batch_size = _inference_batch_size(args)
    loaded = load_run(args.run_dir, backend=args.backend, device=args.device)
    m = evaluate_run(loaded, args.data, max_samples=args.max_samples, allow_pickle=args.allow_pickle,
                     batch_size=batch_size)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  "
          f"({m['num_examples']} examples)")
    width = max(len(n) for n in loaded.labels)
    print(f"{'class':<{width}}  precision  recall  f1      support")
    for name, c in m["per_class"].items():
        print(f"{name:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  {c['support']}")
    print("confusion matrix (rows: true, columns: predicted):")
    for name, row in zip(loaded.labels, m["confusion_matrix"]):
        print(f"  {name:<{width}}  " + " ".join(f"{v:>6}" for v in row))
    return 0


def cmd_predict(args) -> int:
    from loracls.evaluate import load_run
    from loracls.predict import predict_file

    batch_size = _inference_batch_size(args)
    loaded = load_run(args.run_dir, backend=args.backend, device=args.device)
    n = predict_file(loaded, args.input, args.output, args.format, allow_pickle=args.allow_pickle,
                     batch_size=batch_size)
    print(f"wrote {n} predictions to {args.output} ({args.format})")
    return 0


def cmd_export(args) -> int:
    from loracls.export import export_run

    out = export_run(args.run_dir, args.output, overwrite=args.overwrite)
    print(f"exported a merged transformers model to {out}")
    return 0


def cmd_plan(args) -> int:
    from loracls import plan as planning
    from loracls.config import RunConfig, load_config
    from loracls.models import resolve_model_dir

    config = load_config(args.config) if args.config else RunConfig()
    lora_flags = {"rank": "lora.rank", "alpha": "lora.alpha", "targets": "lora.targets", "layers": "lora.layers",
                  "head": "lora.head", "rslora": "lora.rslora", "model": "model"}
    rank = args.rank
    overrides = {v: getattr(args, k) for k, v in lora_flags.items() if getattr(args, k) is not None and k != "rank"}
    if rank is not None and rank != "auto":
        overrides["lora.rank"] = rank
    config = config.with_overrides(overrides)
    if not args.config and not args.model:
        raise LoraclsError("plan needs --model M (or --config FILE)")
    model_config = planning.read_model_config(resolve_model_dir(config.model, need_weights=False),
                                              config.trust_remote_code)
    num_labels = args.num_labels or (_num_labels_hint(config) if args.config and config.data.train else 4)
    if num_labels < 2:
        raise LoraclsError("--num-labels must be at least 2")
    if rank == "auto":
        if args.budget is None:
            raise LoraclsError("--rank auto needs --budget N")
        config = config.with_overrides({"lora.rank": planning.largest_rank(model_config, num_labels, config.lora,
                                                                           args.budget)})
    if args.budget is not None and rank is None and not args.targets:
        plans = planning.enumerate_plans(model_config, num_labels, args.budget)
        if not plans:
            raise LoraclsError(f"no configuration fits a budget of {args.budget:,}; the head alone needs more")
        print(planning.format_plans(plans, limit=args.limit))
        return 0
    p = planning.count(model_config, num_labels, config.lora)
    print(planning.format_plan(p))
    if args.budget is not None:
        planning.check_budget(p, args.budget)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return COMMANDS[args.command](args)
    except LoraclsError as e:
        print(f"loracls {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loracls: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from loracls.train import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(f"loracls: {e}", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    raise SystemExit(main())
