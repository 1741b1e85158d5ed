"""The tokenized train / validation / test splits of a run, and its label mapping, read from its config."""

from __future__ import annotations

from dataclasses import dataclass

from loracls.config import RunConfig
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


def load_splits(config: RunConfig, tokenizer, allow_pickle: bool) -> tuple[dict[str, Split], Labels]:
    """train / validation / test splits, tokenized, and the label mapping decided from the training data (and
    applied to the other two)."""
    d = config.data
    if not d.train:
        raise LoraclsError("no training data; pass --train FILE (or a hub dataset name such as fancyzhx/ag_news)")
    kw = dict(text_columns=d.text_columns, label_column=d.label_column, allow_pickle=allow_pickle)
    train, labels = read_examples(d.train, default_split="train", **kw)
    if d.max_train_samples is not None and len(train) > d.max_train_samples:
        train = train.subset(list(range(d.max_train_samples)))
    present = sorted(set(train.labels))
    if len(present) < 2:
        raise LoraclsError(f"the training data holds a single class ({labels.names[present[0]]!r}); a classifier "
                           "needs examples of at least 2 classes, check the label column (--label-column)")
    if d.validation:
        val, _ = read_examples(d.validation, labels=labels, default_split="validation", **kw)
    elif d.validation_fraction > 0:
        train, val = split_validation(train, d.validation_fraction, config.train.seed)
    else:
        val = None
    test = read_examples(d.test, labels=labels, default_split="test", **kw)[0] if d.test else None
    splits = {}
    for name, ex in (("train", train), ("validation", val), ("test", test)):
        if ex is None:
            continue
        if name != "train" and d.max_eval_samples is not None and len(ex) > d.max_eval_samples:
            ex = ex.subset(list(range(d.max_eval_samples)))
        if len(ex) == 0:
            raise LoraclsError(f"the {name} split is empty; give it more rows")
        ids, truncated = tokenize(tokenizer, ex.texts, d.max_length)
        splits[name] = Split(ex, ids, truncated)
    return splits, labels
