"""Export a run as a plain transformers model folder: LoRA merged into the weights, head included.

The export goes through transformers + PEFT whatever backend trained the run: the adapter is in PEFT's format, so
PEFT's own `merge_and_unload()` produces the plain architecture, and the folder loads with
`AutoModelForSequenceClassification.from_pretrained` or `pipeline("text-classification")` with neither loracls nor
peft installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from loracls.errors import LoraclsError, first_line
from loracls.models import load_tokenizer, resolve_model_dir
from loracls.rundir import RunDir


def export_run(run_dir: str, output: str, *, overwrite: bool = False) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    run = RunDir.open(run_dir)
    run.require_model()
    config, labels = run.read_config(), run.read_labels()
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LoraclsError(f"export folder {output!r} already exists and is not empty; choose a new --output")
    model_dir = resolve_model_dir(config.model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is "newly initialized" only until the adapter is loaded
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, dtype=torch.float32,
            trust_remote_code=config.trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        model = PeftModel.from_pretrained(base, str(run.adapter))
    except Exception as e:
        raise LoraclsError(f"PEFT cannot read {run.adapter} ({first_line(e)}); "
                           "the adapter is damaged, retrain the run") from None
    merged = model.merge_and_unload()
    merged.config.problem_type = "single_label_classification"
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    tokenizer.model_max_length = config.data.max_length  # pipeline(truncation=True) then truncates like loracls
    # Write next to the destination and move into place, so a failure leaves no half-written model folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
