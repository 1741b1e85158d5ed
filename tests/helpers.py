"""Helpers the tests share: run the CLI, build a model the way loracls does, save its adapter in PEFT's format,
and read the same adapter with PEFT or the same export with plain onnxruntime as references."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from loracls import peft_format
from loracls.backends import select_backend
from loracls.config import LoraSettings
from loracls.models import read_model_config

CPU = torch.device("cpu")


# -- the CLI -------------------------------------------------------------------------------------------------------
def train_args(model_dir, train, out, *options) -> list[str]:
    """`loracls train` of the model folder on the TRAIN file into OUT, without progress bars, then OPTIONS; every
    argument a string (paths and numbers may be given)."""
    return [str(a) for a in ("train", "--model", model_dir, "--train", train, "--output-dir", out, "--no-progress",
                             *options)]


def tiny_train_args(model_dir, train, out, *options) -> list[str]:
    """train_args for the shortest real run: one epoch of texts cut at 16 tokens, on the CPU."""
    return train_args(model_dir, train, out, "--epochs", "1", "--max-length", "16", "--device", "cpu", *options)


def run_cli(args, capsys) -> tuple[int, list[str]]:
    """`loracls ARGS` in this process (paths may be given): its exit code and the lines it wrote to stderr."""
    from loracls.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def loracls_command(*args) -> list[str]:
    """`python -m loracls ARGS` with this interpreter, for a subprocess."""
    return [sys.executable, "-m", "loracls", *map(str, args)]


def predicted_probs(run, data, out) -> np.ndarray:
    """The probabilities [N, K] `loracls predict` on the CPU writes for the data file, as JSON lines in OUT."""
    from loracls.cli import main

    assert main(["predict", str(run), "--input", str(data), "--output", str(out), "--device", "cpu"]) == 0
    return np.array([list(json.loads(line)["probs"].values()) for line in Path(out).read_text().splitlines()])


def killed_then_resumed(args, run, before_resume=None):
    """`loracls ARGS` (writing RUN) in a subprocess, killed with SIGKILL once its first checkpoint is on disk, then
    (after `before_resume()`, to look at what the kill left) `train --resume RUN` to the end.  Returns the resumed
    process (its stderr as text), or None where training finished before the kill landed."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(loracls_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (Path(run) / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if json.loads((Path(run) / "run.json").read_text())["status"] == "completed":
        return None
    if before_resume is not None:
        before_resume()
    res = subprocess.run(loracls_command("train", "--resume", run, "--no-progress"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def interrupted_run(args, checkpoints: int) -> int:
    """`loracls ARGS` in this process, stopped as if killed just after its `checkpoints`-th checkpoint reached the
    disk; returns the exit code (130 when the stop landed)."""
    import loracls.training as training
    from loracls.cli import main

    real_save, saves = training.checkpoint.save, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == checkpoints:
            raise KeyboardInterrupt

    training.checkpoint.save = save_then_die
    try:
        return main([str(a) for a in args])
    finally:
        training.checkpoint.save = real_save


def write_csv(path, header: list[str], rows) -> Path:
    """A CSV file with a header row; returns its path."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


# -- models --------------------------------------------------------------------------------------------------------
def with_dropout(model_dir, folder, p: float) -> Path:
    """A copy of `model_dir` in `folder` with hidden and attention dropout p in its config."""
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.update(hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    (Path(folder) / "config.json").write_text(json.dumps(cfg))
    return Path(folder)


def build_model(model_dir, backend: str = "peft", lora: LoraSettings | None = None, seed: int = 0,
                num_labels: int = 4, policy=None):
    """A backend's fresh classifier for the model folder, built as `loracls train` builds it."""
    lora = lora or LoraSettings(rank=4, alpha=16, dropout=0.1)
    cfg = read_model_config(str(model_dir))
    chosen, _ = select_backend(backend, cfg, lora)
    assert chosen.name == backend
    extra = {"policy": policy} if policy is not None else {}
    return chosen.build(str(model_dir), cfg, num_labels, lora, CPU, seed=seed, **extra)


def save_adapter(model, lora: LoraSettings, folder: Path, base_model: str = "x") -> None:
    peft_format.write_adapter(folder, peft_format.adapter_config(lora, model.layout, base_model=str(base_model)),
                              model.adapter_state_dict())


# -- references: PEFT itself on the original base model, never loracls -------------------------------------------
def peft_trainable_count(model_dir, target_modules, num_labels: int = 4, **config) -> int:
    """PEFT's own trainable-parameter count of a LoRA on the real model (target_modules as PEFT matches them)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
        return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=target_modules, **config)) \
            .get_nb_trainable_parameters()[0]


def peft_reference(model_dir, adapter, num_labels: int = 4, merged: bool = False):
    """The saved adapter read by PEFT onto the original base model (optionally merged), in eval mode."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
        model = PeftModel.from_pretrained(base, str(adapter))
    return (model.merge_and_unload() if merged else model).eval()


def peft_logits(model_dir, adapter, texts, max_length: int | None = None, merged: bool = False,
                num_labels: int = 4):
    """Logits [N, K] (numpy, float32) of PEFT's model of the adapter, on the model's own tokenizer's padded batch
    (truncated at max_length, special tokens included, when given)."""
    from transformers import AutoTokenizer

    model = peft_reference(model_dir, adapter, num_labels, merged)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    trunc = {"truncation": True, "max_length": max_length} if max_length else {}
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), 64):
            enc = tok(list(texts[s:s + 64]), padding=True, return_tensors="pt", **trunc)
            out.append(model(**enc).logits.float())
    return torch.cat(out).numpy()


def onnx_logits(folder, texts, **tokenizer_options):
    """Logits [N, K] of an exported folder as plain onnxruntime reads it, without loracls: the folder's own
    tokenizer through transformers, padded, fed by the graph's input names.  Returns (logits, input names)."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    session = ort.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    enc = AutoTokenizer.from_pretrained(str(folder))(list(texts), padding=True, return_tensors="np",
                                                     **tokenizer_options)
    return session.run(["logits"], {n: enc[n].astype(np.int64) for n in names})[0], names


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
