"""Every default lives here, once: typed dataclasses validated as they are built.

A YAML config mirrors `RunConfig` (top-level keys `model`, `backend`, ..., and the sections `lora`, `data`,
`train`).  Command-line flags override single fields through `RunConfig.with_overrides`.  Unknown keys are an
error that names the closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from loracls.errors import LoraclsError
from loracls.families import normalize_targets

HEAD_CHOICES = ("native", "linear", "native-lora")
LORA_METHODS = ("lora", "dora")  # the methods that train LoRA (what a sweep searches)
METHOD_CHOICES = (*LORA_METHODS, "full")
INIT_CHOICES = ("kaiming", "pissa")
SCHEDULE_CHOICES = ("linear", "cosine", "constant")
LOG_CHOICES = ("none", "tensorboard")
BACKEND_CHOICES = ("auto", "fast", "peft")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
QUOTING_CHOICES = ("auto", "csv", "none")
LABEL_CASE_CHOICES = ("check", "fold", "exact")
TASK_CHOICES = ("auto", "single-label", "multi-label", "regression")  # loracls.tasks.TASKS implements each but auto


def choices(values: tuple[str, ...]) -> dict:
    """Field metadata naming a field's allowed values (the CLI offers them as argparse choices)."""
    return {"choices": values}


def _whole_numbers(obj) -> None:
    """Integer fields given as integral floats (16.0 from 64/4, or YAML) become ints; others stay for the checks."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if str(f.type).startswith("int") and isinstance(value, float) and math.isfinite(value) \
                and value.is_integer():
            setattr(obj, f.name, int(value))


def _seed(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise LoraclsError(f"{name} must be a whole number from 0 to 2**32 - 1, got {value!r}")


def _positive(name: str, value, kind=int):
    if isinstance(value, float) and not math.isfinite(value):
        raise LoraclsError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise LoraclsError(f"{name} must be a {'whole number' if kind is int else 'number'}, got {value!r}")
    if value <= 0:
        raise LoraclsError(f"{name} must be greater than 0, got {value}; pass a positive value")


def _fraction(name: str, value, *, allow_zero=True, allow_one=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraclsError(f"{name} must be a number, got {value!r}")
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        raise LoraclsError(f"{name} must be in [0, {'1]' if allow_one else '1)'}, got {value}")


def _choice(name: str, value, choices):
    if value not in choices:
        raise LoraclsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class LoraSettings:
    """Where the trainable parameters go."""

    rank: int = 6
    """LoRA rank r: the inner dimension of B @ A.  0 < r <= hidden size."""
    alpha: float = 24.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A, or alpha / sqrt(r) with rslora."""
    dropout: float = 0.1
    """Dropout on the LoRA branch's input only, as in PEFT."""
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value"])
    """Linear layers that get LoRA: query, key, value (q, k, v), attention-output, ffn-in, ffn-out, all-linear,
    or module-name suffixes; the same names for every model family (see loracls.families)."""
    layers: list[int] | None = None
    """Encoder layer indices that get LoRA; None means all layers."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r) instead of alpha / r."""
    head: str = field(default="native", metadata=choices(HEAD_CHOICES))
    """Classification head: native (the model's own head, trained), linear (only the final projection), or
    native-lora (LoRA on the head's dense layer, final projection trained)."""
    method: str = field(default="lora", metadata=choices(METHOD_CHOICES))
    """lora, dora (weight-decomposed LoRA, Liu et al. 2024: also a trained magnitude per output feature of each
    adapted layer), or full (no LoRA: every parameter of the encoder and the head trained, the baseline a budget is
    read against; the rank, alpha, dropout, targets and rslora are then ignored, and layers, layer_ranks, init
    pissa, a head other than native, a LoRA+ ratio and a classifier warm-up refused)."""
    init: str = field(default="kaiming", metadata=choices(INIT_CHOICES))
    """kaiming (A random, B zero: step 0 is the base model), or pissa (A and B from the weight's top singular
    vectors, the frozen base keeps the residual; Meng et al. 2024).  A PiSSA adapter is saved as the equivalent
    plain LoRA of twice the rank, which PEFT and every backend load on the original model."""
    layer_ranks: dict[int, int] | None = None
    """Ranks for some layers instead of `rank`, e.g. {0: 2, 11: 16} (on the command line 0:2,11:16).  The
    scaling stays alpha / r per layer, as PEFT's rank_pattern."""

    def __post_init__(self):
        _whole_numbers(self)
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha, float)
        _fraction("lora.dropout", self.dropout)
        self.targets = normalize_targets(self.targets)
        if self.layers is not None:
            if isinstance(self.layers, str):
                try:
                    self.layers = [int(x) for x in self.layers.split(",") if x.strip()]
                except ValueError:
                    raise LoraclsError(f"lora.layers {self.layers!r} is not a comma list of layer indices, e.g. "
                                       "0,1,5") from None
            if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                raise LoraclsError(f"lora.layers must be a list of layer indices >= 0, got {self.layers!r}")
            self.layers = sorted(set(self.layers))
        _choice("lora.head", self.head, HEAD_CHOICES)
        _choice("lora.method", self.method, METHOD_CHOICES)
        _choice("lora.init", self.init, INIT_CHOICES)
        if self.init == "pissa" and self.method != "lora":
            raise LoraclsError("lora.init pissa initialises plain LoRA; use --method lora with --init pissa")
        if self.layer_ranks is not None:
            self.layer_ranks = _layer_ranks(self.layer_ranks)
        if self.full and (self.layers is not None or self.layer_ranks is not None):
            raise LoraclsError("lora.layers and lora.layer_ranks place LoRA, and --method full trains every layer "
                               "in full; drop --layers and --layer-ranks, or use --method lora")
        if self.full and self.head != "native":
            raise LoraclsError(f"lora.head {self.head} freezes part of the head, and --method full trains the "
                               "model's own head in full; use --head native")

    @property
    def full(self) -> bool:
        """No LoRA: every parameter of the encoder and the head trains (method full)."""
        return self.method == "full"

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.rank)

    def scaling_for(self, rank: int) -> float:
        return self.alpha / (rank ** 0.5 if self.rslora else rank)


def _layer_ranks(value) -> dict[int, int]:
    """{layer: rank} from a mapping or the CLI's '0:2,11:16'."""
    if isinstance(value, str):
        try:
            value = {int(k): int(v) for k, v in (item.split(":") for item in value.split(",") if item.strip())}
        except ValueError:
            raise LoraclsError(f"lora.layer_ranks {value!r} is not layer:rank pairs; write e.g. 0:2,11:16") from None
    if not isinstance(value, dict) or not value:
        raise LoraclsError(f"lora.layer_ranks must map layer indices to ranks, e.g. {{0: 2, 11: 16}}, got {value!r}")
    out = {}
    for k, v in value.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise LoraclsError(f"lora.layer_ranks has layer {k!r}; layers are indices >= 0")
        _positive(f"lora.layer_ranks[{k}]", v)
        out[k] = int(v)
    return dict(sorted(out.items()))


@dataclass
class DataSettings:
    """Where examples come from.  Each source is a local file or a hub dataset name ('name' or 'name:split')."""

    train: str | None = None
    """Training data: CSV/TSV (with or without header), JSONL, Parquet, or a hub dataset."""
    validation: str | None = None
    """Validation data; if absent, validation_fraction of train is held out (with split_seed, else train.seed)."""
    test: str | None = None
    """Test data, evaluated once at the end with the best epoch's model."""
    text_columns: list[str] | None = None
    """Columns joined with a space to form the text; None detects them (title+description, text, sentence...)."""
    text_pair_columns: list[str] | None = None
    """Two columns read as a text pair (a,b), encoded as the tokenizer's pair (its separator and token types) with
    the longer text cut first; None detects a pair by its header: sentence1 and sentence2, question and sentence,
    premise and hypothesis, or another pair of loracls.data.columns.PAIR_NAMES."""
    label_column: str | None = None
    """Column holding the label (an index or a class name); None detects it (label, class, ...)."""
    validation_fraction: float = 0.1
    """Share of train held out as validation when no validation source is given."""
    split_seed: int | None = None
    """Seed of the validation_fraction hold-out; None uses train.seed.  Runs of different seeds that give the same
    split_seed hold out the same rows: a student and its teachers (else a teacher has learned the student's
    validation texts), or the seeds of a comparison."""
    max_train_samples: int | None = None
    """Use at most this many rows of the training source (taken before the validation hold-out)."""
    max_eval_samples: int | None = None
    """Use at most this many rows of the validation and test sets."""
    max_length: int = 256
    """Longer inputs are truncated to this many tokens (counted in the report)."""
    quoting: str = field(default="auto", metadata=choices(QUOTING_CHOICES))
    """Quotes in CSV/TSV files: csv (a field may be quoted), none (quotes are plain text, as in GLUE's TSV files),
    or auto (csv, except that a tab-separated file whose quotes break its rows is read with none, and says so)."""
    label_case: str = field(default="check", metadata=choices(LABEL_CASE_CHOICES))
    """Labels equal but for case (Business, business): check refuses them, fold makes them one class, exact keeps
    them apart.  Every command then compares labels the same way."""
    labels_as_names: bool = False
    """Read each distinct label value as a class name, even where the column looks like row ids, a regression
    target or lists of labels (refused otherwise), and without filling integer ranges."""
    task: str = field(default="auto", metadata=choices(TASK_CHOICES))
    """What the label is: single-label (one class per text), multi-label (any number of classes per text: sigmoid
    and binary cross-entropy, a decision threshold per label tuned on validation), regression (a number per text:
    MSE loss, Pearson and Spearman), or auto: multi-label where the label column holds lists of labels, or
    label_columns or label_separator is given, else single-label.  A run stores the task it chose."""
    label_separator: str | None = None
    """Multi-label: the separator between the labels of one cell ("World,Sports" -> ','); None detects ',', ';'
    or '|' (a JSON list needs none).  An empty cell is a text with no labels."""
    label_columns: list[str] | None = None
    """Multi-label: several 0/1 columns, one per label, named by header or 0-based index (the column names become
    the labels), instead of one label column."""
    unlabelled: str | None = None
    """Texts without labels (a file or hub dataset, read with the training data's text columns) that a student
    (train.teacher) also learns from, through its teachers' outputs alone; texts also in validation or test are
    dropped."""

    def __post_init__(self):
        if isinstance(self.text_columns, str):
            self.text_columns = [c.strip() for c in self.text_columns.split(",") if c.strip()]
        if self.text_columns is not None and not self.text_columns:
            raise LoraclsError("data.text_columns is empty; pass e.g. --text-columns title,description")
        if isinstance(self.text_pair_columns, str):
            self.text_pair_columns = [c.strip() for c in self.text_pair_columns.split(",") if c.strip()]
        if self.text_pair_columns is not None:
            self.text_pair_columns = [str(c) for c in self.text_pair_columns]
            if len(self.text_pair_columns) != 2:
                raise LoraclsError(f"data.text_pair_columns must name two columns, got {self.text_pair_columns!r}; "
                                   "pass e.g. --text-pair-columns sentence1,sentence2")
            if self.text_columns is not None:
                raise LoraclsError("data.text_columns and data.text_pair_columns are both given; pass "
                                   "--text-columns for one text or --text-pair-columns for a pair, not both")
        if isinstance(self.label_columns, str):
            self.label_columns = [c.strip() for c in self.label_columns.split(",") if c.strip()]
        if self.label_columns is not None:
            self.label_columns = [str(c) for c in self.label_columns]
            if len(self.label_columns) < 2:
                raise LoraclsError(f"data.label_columns must name at least two 0/1 columns, got "
                                   f"{self.label_columns!r}; pass e.g. --label-columns toxic,insult,threat")
            if self.label_column is not None:
                raise LoraclsError("data.label_column and data.label_columns are both given; pass --label-column for "
                                   "one label column or --label-columns for several 0/1 columns, not both")
        if self.label_separator is not None and (not isinstance(self.label_separator, str)
                                                 or not self.label_separator.strip()):
            raise LoraclsError(f"data.label_separator must be a non-blank string such as ',', got "
                               f"{self.label_separator!r}")
        multi = self.label_columns is not None or self.label_separator is not None
        if multi and self.task not in ("auto", "multi-label"):
            raise LoraclsError(f"--label-columns and --label-separator describe multi-label data, but data.task is "
                               f"{self.task}; pass --task multi-label (or auto), or drop them")
        _whole_numbers(self)
        _fraction("data.validation_fraction", self.validation_fraction)
        if self.split_seed is not None:
            _seed("data.split_seed", self.split_seed)
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                _positive(f"data.{name}", getattr(self, name))
        _positive("data.max_length", self.max_length)
        _choice("data.quoting", self.quoting, QUOTING_CHOICES)
        _choice("data.task", self.task, TASK_CHOICES)
        _choice("data.label_case", self.label_case, LABEL_CASE_CHOICES)


@dataclass
class TrainSettings:
    """The optimization recipe."""

    epochs: int = 3
    """Passes over the training set."""
    batch_size: int = 16
    """Examples per optimizer step (before gradient accumulation)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    lora_plus_ratio: float = 1.0
    """LoRA+: the lr of the B matrices is lr * this ratio (1 = plain LoRA)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = field(default="linear", metadata=choices(SCHEDULE_CHOICES))
    """Learning-rate decay after warmup: linear, cosine or constant."""
    warmup_ratio: float = 0.1
    """Share of all optimizer steps spent warming the lr up linearly from 0."""
    head_warmup_ratio: float = 0.0
    """Share of the steps that train the classification head alone before LoRA starts (a classifier warm-up);
    LoRA then follows its own warmup and decay over the remaining steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    class_weights: str | None = None
    """Weigh each class's loss (single-label): balanced (n / (classes * rows of the class) over the training
    split, scikit-learn's 'balanced'), or a JSON file {"class name": weight, ...} naming every class; None weighs
    all classes alike."""
    teacher: list[str] | None = None
    """Completed loracls runs to learn from besides the labels (distillation; any method, family or backend, same
    task and labels): their outputs on this run's texts, averaged, are computed once and stored in the run.  On the
    command line a comma list: --teacher runs/a,runs/b."""
    distill_alpha: float = 0.5
    """With teachers, the loss is (1 - alpha) * the task's loss + alpha * T^2 * KL(teacher_T || student_T) (binary
    KL per label for multi-label; for regression alpha * the squared error to the teachers' value)."""
    distill_temperature: float = 2.0
    """T: softens the teachers' and the student's distributions before the KL (1 = as they are)."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without a better validation accuracy; None never stops early."""
    seed: int = 42
    """Seeds the validation split, the data order, LoRA init and dropout."""
    log_every: int | None = None
    """Write loss and lr to history.jsonl every this many optimizer steps; None: about 100 points over the run,
    and never fewer than one every 50 steps."""
    save_every_steps: int | None = None
    """Save a resumable checkpoint every this many optimizer steps (always at epoch ends and on interrupt)."""
    eval_batch_size: int = 64
    """Examples per forward pass when evaluating and predicting."""
    log_to: str = field(default="none", metadata=choices(LOG_CHOICES))
    """Also log loss, lr and validation metrics to: none, or tensorboard (event files in the run's tensorboard/;
    needs pip install tensorboard)."""

    def __post_init__(self):
        _whole_numbers(self)
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.lr", self.lr, float)
        _positive("train.lora_plus_ratio", self.lora_plus_ratio, float)
        _positive("train.adam_eps", self.adam_eps, float)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise LoraclsError(f"train.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float)) or self.grad_clip < 0:
            raise LoraclsError(f"train.grad_clip must be a number >= 0 (0 disables), got {self.grad_clip!r}")
        _choice("train.schedule", self.schedule, SCHEDULE_CHOICES)
        _choice("train.log_to", self.log_to, LOG_CHOICES)
        _fraction("train.warmup_ratio", self.warmup_ratio)
        _fraction("train.head_warmup_ratio", self.head_warmup_ratio)
        _fraction("train.label_smoothing", self.label_smoothing)
        if isinstance(self.teacher, str):
            self.teacher = [c.strip() for c in self.teacher.split(",") if c.strip()]
        if self.teacher is not None and (not self.teacher or not all(isinstance(t, str) and t for t in self.teacher)):
            raise LoraclsError(f"train.teacher must name completed runs, e.g. --teacher runs/a,runs/b; got "
                               f"{self.teacher!r}")
        _fraction("train.distill_alpha", self.distill_alpha, allow_one=True)
        _positive("train.distill_temperature", self.distill_temperature, float)
        _seed("train.seed", self.seed)
        for name in ("early_stopping_patience", "save_every_steps", "log_every"):
            if getattr(self, name) is not None:
                _positive(f"train.{name}", getattr(self, name))


@dataclass
class RunConfig:
    """Everything needed to rebuild a run.  Saved as config.yaml in the run directory."""

    model: str = "FacebookAI/roberta-base"
    """Hugging Face model id or local folder of an encoder."""
    backend: str = field(default="auto", metadata=choices(BACKEND_CHOICES))
    """Model backend: fast (own packed encoder), peft (transformers + PEFT), or auto (fast where supported)."""
    device: str = field(default="auto", metadata=choices(DEVICE_CHOICES))
    """Where to run; auto picks cuda when available."""
    precision: str = field(default="auto", metadata=choices(PRECISION_CHOICES))
    """bf16: frozen weights and activations in bfloat16, LoRA and the head in fp32, fp32 loss and logits; fp32; or
    auto: bf16 for the fast backend on CUDA and on CPUs with bf16 matrix units (AVX-512 BF16, AMX), else fp32.
    The peft backend stays fp32 under auto (bf16 runs it under torch.autocast)."""
    output_dir: str | None = None
    """Run directory; None makes runs/<model>-<timestamp>."""
    max_trainable: int | None = None
    """Refuse to start when the trainable-parameter count exceeds this budget."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless asked for."""
    threads: int | None = None
    """CPU threads for PyTorch; None keeps PyTorch's default (one per core).  On a machine whose cores are busy
    with other work, set it to the number of idle cores: oversubscribed threads can make a step 25x slower."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise LoraclsError("model must be a hub id or a local folder, e.g. --model FacebookAI/roberta-base")
        _choice("backend", self.backend, BACKEND_CHOICES)
        _choice("device", self.device, DEVICE_CHOICES)
        _choice("precision", self.precision, PRECISION_CHOICES)
        _whole_numbers(self)
        if self.max_trainable is not None:
            _positive("max_trainable", self.max_trainable)
        if self.threads is not None:
            _positive("threads", self.threads)
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, prefix=f"{name}."))
        if self.data.unlabelled is not None and not self.train.teacher:
            raise LoraclsError("data.unlabelled texts are learned from a teacher's outputs; pass --teacher RUN "
                               "(a completed run), or drop --unlabelled")

    @property
    def split_seed(self) -> int:
        """The seed the validation share of the training data is held out with: data.split_seed, else train.seed."""
        return self.train.seed if self.data.split_seed is None else self.data.split_seed

    # -- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise LoraclsError("a config must be a YAML mapping of keys to values, e.g. 'model: ...'")
        return _build(cls, data, prefix="")

    def with_absolute_paths(self) -> "RunConfig":
        """A copy whose local model folder and data files are absolute paths, so the run loads from any folder
        (and a relative name never resolves to a hub model later).  Hub ids and dataset names stay as they are."""
        def absolute(value: str | None) -> str | None:
            if value is None:
                return None
            p = Path(value).expanduser()
            return os.path.normpath(p.absolute()) if p.exists() else value  # stored without `..`

        return self.with_overrides({"model": absolute(self.model), "data.train": absolute(self.data.train),
                                    "data.validation": absolute(self.data.validation),
                                    "data.test": absolute(self.data.test),
                                    "data.unlabelled": absolute(self.data.unlabelled),
                                    "train.teacher": None if self.train.teacher is None else
                                    [absolute(t) for t in self.train.teacher]})

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """Return a copy with dotted keys ('train.lr', 'lora.rank', 'model') replaced.  None values are skipped."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            parts = key.split(".")
            node = data
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
        return RunConfig.from_dict(data)


SECTIONS = {"lora": LoraSettings, "data": DataSettings, "train": TrainSettings}


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), on one line.  The CLI's help is
    made from these, so a field is documented once."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): help without the docs
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_paths() -> dict[str, str]:
    """Every config field by its plain name ('lr', 'rank', 'train' for the training data, ...) -> its dotted
    path ('train.lr', 'lora.rank', 'data.train').  The names are unique across the sections: they are the CLI's
    flags and the Python API's keywords."""
    out = {f.name: f.name for f in fields(RunConfig) if f.name not in SECTIONS}
    for section, cls in SECTIONS.items():
        out.update({f.name: f"{section}.{f.name}" for f in fields(cls)})
    return out


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise LoraclsError(f"config section {prefix.rstrip('.')!r} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise LoraclsError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = dict(data)
    if cls is RunConfig:
        for name, sub in SECTIONS.items():
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = _build(sub, kwargs[name], prefix=f"{name}.")
            elif name in kwargs:
                kwargs.pop(name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as e:  # a wrong value type deep inside a dataclass
        raise LoraclsError(f"bad value in config section {prefix.rstrip('.') or 'top level'}: {e}") from None


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, but numbers like 1e-3 are floats (YAML 1.2) rather than the strings YAML 1.1 makes them."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config safely (never arbitrary object construction)."""
    p = Path(path)
    if p.is_dir():
        raise LoraclsError(f"config {str(p)!r} is a folder, not a YAML file; pass a file such as "
                           "configs/agnews-roberta-base.yaml")
    if not p.is_file():
        raise LoraclsError(f"config file {str(p)!r} does not exist; check the --config path")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError:
        raise LoraclsError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LoraclsError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        data = {}
    return RunConfig.from_dict(data)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
