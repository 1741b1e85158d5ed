"""The tokenized train / validation / test splits of a run, its label mapping, read from its config, and the
data summary: what was read and how, printed before training and kept in run.json and report.md."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from loracls.config import DataSettings, RunConfig
from loracls.data.common import MissingColumn
from loracls.data.examples import Examples, read_examples, split_validation
from loracls.data.labels import Labels
from loracls.errors import LoraclsError
from loracls.models import tokenize


@dataclass
class Split:
    examples: Examples
    token_ids: list[list[int]]
    truncated: int

    @property
    def labels(self) -> list[int]:
        return self.examples.labels


def read_options(d: DataSettings) -> dict:
    """read_examples' keywords from a run's data settings, so that training, a resume, `evaluate` and `predict`
    read a file the same way."""
    return dict(text_columns=d.text_columns, text_pair_columns=d.text_pair_columns, label_column=d.label_column,
                quoting=d.quoting, label_case=d.label_case, labels_as_names=d.labels_as_names,
                task=d.task, label_columns=d.label_columns, label_separator=d.label_separator)


def columns_read(reading: dict) -> dict:
    """read_examples' column keywords for the columns a read used, given or detected: the text columns, or the
    text pair's, and the label column (or a multi-label run's 0/1 columns)."""
    pair = reading.get("text_pair", False)
    return {"text_columns": None if pair else reading["text_columns"],
            "text_pair_columns": reading["text_columns"] if pair else None, "label_column": reading["label_column"],
            "label_columns": reading.get("label_columns")}


def task_read(reading: dict) -> dict:
    """read_examples' keywords for the task a training read chose (and a multi-label run's separator), so that
    the run's other files are read as the same task."""
    return {"task": reading["task"], "label_separator": reading["label_separator"]}


def resolved_columns(splits: dict[str, Split]) -> dict:
    """The columns training used, as config overrides: config.yaml stores them, so that a resume or `evaluate`
    reads files the same way even where training detected them.  A pair is stored as data.text_pair_columns
    (with_overrides skips a None: the text field a run does not use keeps the config's None); so are the task
    chosen and a multi-label run's separator."""
    reading = splits["train"].examples.reading
    return {f"data.{k}": v for k, v in {**columns_read(reading), **task_read(reading)}.items()}


def held_out(train: Examples, d: DataSettings, seed: int) -> tuple[Examples, Examples | None]:
    """The training file's examples as a run trains on them: cut to max_train_samples, then the validation share
    held out with `seed` (RunConfig.split_seed; None when a validation file gives that split, or none is held
    out)."""
    if d.max_train_samples is not None and len(train) > d.max_train_samples:
        train = train.subset(list(range(d.max_train_samples)))
    if d.validation or d.validation_fraction <= 0:
        return train, None
    return split_validation(train, d.validation_fraction, seed)


def load_splits(config: RunConfig, tokenizer, allow_pickle: bool) -> tuple[dict[str, Split], Labels]:
    """train / validation / test splits, tokenized, and the label mapping decided from the training data (and
    applied to the other two, read with the columns chosen for the training data)."""
    d = config.data
    if not d.train:
        raise LoraclsError("no training data; pass --train FILE (or a hub dataset name such as fancyzhx/ag_news)")
    kw = dict(read_options(d), allow_pickle=allow_pickle)
    train, labels = read_examples(d.train, default_split="train", **kw)
    kw.update(columns_read(train.reading), **task_read(train.reading))
    train, val = held_out(train, d, config.split_seed)
    if train.reading["task"] == "single-label":
        present = sorted(set(train.labels) | set(val.labels if val is not None else ()))
        if len(present) < 2:
            raise LoraclsError(f"the training data holds a single class ({labels.names[present[0]]!r}); a "
                               "classifier needs examples of at least 2 classes, check the label column "
                               "(--label-column)")
    if d.validation:
        val, _ = read_examples(d.validation, labels=labels, default_split="validation", **kw)
    test = read_examples(d.test, labels=labels, default_split="test", **kw)[0] if d.test else None
    unlabelled = _unlabelled(d.unlabelled, kw, (val, test)) if d.unlabelled else None
    splits = {}
    for name, ex in (("train", train), ("validation", val), ("test", test), ("unlabelled", unlabelled)):
        if ex is None:
            continue
        if name in ("validation", "test") and d.max_eval_samples is not None and len(ex) > d.max_eval_samples:
            ex = ex.subset(list(range(d.max_eval_samples)))
        if len(ex) == 0:
            more = " that are in neither validation nor test" if name == "unlabelled" else ""
            raise LoraclsError(f"the {name} split is empty; give it more rows{more}")
        ids, truncated = tokenize(tokenizer, ex.texts, d.max_length)
        splits[name] = Split(ex, ids, truncated)
    return splits, labels


def read_with_columns(source: str, options: dict, *, detect_if_missing: bool = True,
                      **kw) -> tuple[Examples, str | None]:
    """Read `source` with a run's columns (`options`: read_options' keywords, with the columns training used).  A
    file laid out unlike the training data (no header, other names) is read with the columns detected in it, as
    training detects them, and the note returned says so (None: the run's columns were found); it must hold a
    text pair where the run reads pairs, and one text where it does not.  detect_if_missing=False: a missing
    column is the caller's error (the user named the columns)."""
    try:
        return read_examples(source, **kw, **options)[0], None
    except MissingColumn:
        if not detect_if_missing:
            raise
    examples, _ = read_examples(source, **kw, **{**options, "text_columns": None, "text_pair_columns": None,
                                                 "label_column": None})
    r, pairs = examples.reading, options["text_pair_columns"] is not None
    run_columns = ", ".join(options["text_pair_columns"] or options["text_columns"] or [])
    if r["text_pair"] != pairs:  # never feed a pair model one text, or the reverse
        raise LoraclsError(f"{source!r} lacks the run's {'pair' if pairs else 'text'} columns ({run_columns}) and its "
                           f"own columns hold {'one text' if pairs else 'a text pair'}; name the run's "
                           f"{'pair with --text-pair-columns a,b' if pairs else 'text with --text-columns'}")
    label = f", label {r['label_column']!r}" if kw.get("require_labels", True) else ""
    return examples, (f"{source} lacks the run's columns (text {run_columns}); read with its own: text "
                      f"{' + '.join(map(repr, r['text_columns']))} ({r['text_why']}){label}")


def _unlabelled(source: str, kw: dict, held_out: tuple[Examples | None, ...]) -> Examples:
    """The texts of data.unlabelled, read with the training data's columns (or, where it lacks them, its own), less
    those that validation or test also hold: a text the student has learned from scores nothing there."""
    ex, note = read_with_columns(source, kw, require_labels=False, default_split="train")
    seen = {t for split in held_out if split is not None for t in split.texts}
    keep = [i for i, t in enumerate(ex.texts) if t not in seen]
    kept = ex.subset(keep)
    kept.reading = {**(ex.reading or {}), "in_held_out": len(ex) - len(keep), "note": note}
    return kept


def summary(splits: dict[str, Split], labels: Labels, d: DataSettings, task: str = "single-label") -> dict:
    """The facts of the data summary (run.json's "data"): sources and layouts, the columns and why, the task and
    its classes (or a regression's range of targets), rows dropped and truncated."""
    train = splits["train"]
    r = train.examples.reading
    sources = {}
    for name, s in splits.items():
        read = s.examples.reading or {}
        held_out = name == "validation" and read.get("source") == r["source"] and not d.validation
        sources[name] = {"source": read.get("source"), "layout": read.get("layout"), "held_out": held_out}
    return {
        "task": task,
        "sources": sources,
        "text_columns": r["text_columns"], "text_pair": r["text_pair"], "text_why": r["text_why"],
        "label_column": r["label_column"], "label_columns": r.get("label_columns"), "label_why": r["label_why"],
        "labels": r["labels"],
        "task_why": r.get("task_why", ""),
        **(_targets(train.labels) if task == "regression" else _classes(train.labels, labels, task)),
        "dropped_empty_text": {name: s.examples.skipped_empty for name, s in splits.items()
                               if not sources[name]["held_out"]},
        "first_dropped": r["empty_text_first"],
        "truncated": {name: [s.truncated, len(s.token_ids)] for name, s in splits.items()},
        "max_length": d.max_length,
        **({"unlabelled": _unlabelled_facts(splits["unlabelled"])} if "unlabelled" in splits else {}),
    }


def _unlabelled_facts(split: Split) -> dict:
    r = split.examples.reading
    return {"texts": len(split.token_ids), "in_held_out": r.get("in_held_out", 0), "note": r.get("note")}


def _classes(train_labels: list, labels: Labels, task: str) -> dict:
    """Rows per class (a multi-label row counts for each of its labels), the smallest and largest classes; for
    multi-label also the rows without a label and the mean labels per row."""
    extra = {}
    if task == "multi-label":
        per_class = [sum(col) for col in zip(*train_labels)] if train_labels else [0] * len(labels)
        sizes = [sum(row) for row in train_labels]
        extra = {"rows_without_labels": sum(1 for n in sizes if n == 0),
                 "labels_per_row": sum(sizes) / max(len(sizes), 1)}
    else:
        counts = Counter(train_labels)
        per_class = [counts.get(j, 0) for j in range(len(labels))]
    small = min(range(len(per_class)), key=per_class.__getitem__)
    large = max(range(len(per_class)), key=per_class.__getitem__)
    return {"classes": len(labels), "smallest_class": [labels.names[small], per_class[small]],
            "largest_class": [labels.names[large], per_class[large]],
            "empty_classes": sum(1 for c in per_class if c == 0), **extra}


def _targets(train_labels: list[float]) -> dict:
    return {"targets": [min(train_labels), max(train_labels), sum(train_labels) / len(train_labels)]}


def summary_lines(facts: dict) -> list[str]:
    """The data summary as a few lines of text, each starting "data:" (stderr and report.md)."""
    def cols(names: list[str]) -> str:
        return " + ".join(repr(c) for c in names)

    parts = []
    for name, s in facts["sources"].items():
        if s["held_out"]:
            parts.append(f"{name} held out from train")
        else:
            parts.append(f"{name} {s['source']!r} ({s['layout']})")
    pair = facts.get("text_pair", False)  # absent from the run.json of runs before pairs
    joined = len(facts["text_columns"]) > 1 and not pair
    if pair:
        text = "text pair {} and {}, encoded as the tokenizer's pair".format(*map(repr, facts["text_columns"]))
    else:
        text = f"text {cols(facts['text_columns'])}" + (" joined with a space" if joined else "")
    text += f" ({facts['text_why']})" if facts["text_why"] else ""
    columns = facts.get("label_columns")
    label = f"labels {cols(columns)}" if columns else f"label {facts['label_column']!r}"
    label += f" ({facts['label_why']})" if facts["label_why"] else ""
    if "targets" in facts:
        lo, hi, mean = facts["targets"]
        classes = f"{facts['task']} ({facts['labels']}); train targets from {lo:g} to {hi:g}, mean {mean:.4g}"
    else:
        (small, n_small), (large, n_large) = facts["smallest_class"], facts["largest_class"]
        classes = f"{facts['task']}, {facts['classes']} classes ({facts['labels']}); train rows per class: " \
                  f"smallest {small!r} {n_small:,}, largest {large!r} {n_large:,}"
        if facts["empty_classes"]:
            classes += f"; {facts['empty_classes']} classes have no train rows"
        if "labels_per_row" in facts:
            classes += f"; {facts['labels_per_row']:.2f} labels per row, {facts['rows_without_labels']:,} rows " \
                       "without a label"
    if facts.get("task_why"):
        classes += f"; task {facts['task']}: {facts['task_why']}"
    dropped = ", ".join(f"{name} {n:,}" for name, n in facts["dropped_empty_text"].items() if n)
    first = f" (first: {', '.join(facts['first_dropped'])})" if facts["first_dropped"] else ""
    cut = ", ".join(f"{name} {n:,} of {total:,}" for name, (n, total) in facts["truncated"].items())
    cut_note = ""
    if any(n for n, _ in facts["truncated"].values()):
        cut_note = "; a cut drops the end of the joined text, the last column first" if joined else \
            "; a cut shortens the longer text of a pair first" if pair else ""
    lines = [f"data: read {'; '.join(parts)}",
             f"data: {text}; {label}",
             f"data: {classes}",
             f"data: rows dropped for empty text: {dropped + first if dropped else 'none'}",
             f"data: rows truncated to {facts['max_length']} tokens: {cut}{cut_note}"]
    if "unlabelled" in facts:
        u = facts["unlabelled"]
        dropped_held_out = f", {u['in_held_out']:,} more dropped: also in validation or test" \
            if u["in_held_out"] else ""
        lines.append(f"data: unlabelled: {u['texts']:,} texts learned from the teachers' outputs alone"
                     f"{dropped_held_out}" + (f"; {u['note']}" if u["note"] else ""))
    return lines
