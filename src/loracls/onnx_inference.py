"""Serving a run through ONNX Runtime: `loracls predict RUN --backend onnx` and `loracls.load(RUN, backend="onnx")`.

The first use exports the run once, atomically, into `RUN/onnx/` (or `RUN/onnx-int8/`); later uses read it.
Serving needs only onnxruntime, `tokenizers` and numpy: this module imports neither torch nor transformers, so a
prediction process starts in a fraction of a second (start-up is part of an end-to-end figure).  Only the export
itself imports torch: when the folder is missing, or was made from another adapter or by a loracls that made
another graph.

Tokenization is the model's own tokenizer.json through `tokenizers`, truncated like training (special tokens
included in max_length; texts cut by characters first, as loracls.models.tokenize does), so the ids are the ones
`loracls predict` feeds the PyTorch backends.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from loracls.data import Labels
from loracls.errors import LoraclsError, first_line
from loracls.models import tokenize
from loracls.onnx_export import GRAPH_REVISION, onnx_logits
from loracls.rundir import ADAPTER_WEIGHTS, MODEL_WEIGHTS, RunDir, onnx_dir
from loracls.tasks import run_task

# The ONNX inference backends and the quantization each serves.
ONNX_BACKENDS = {"onnx": None, "onnx-int8": "int8"}


def _adapter_hash(run: RunDir) -> str:
    """The adapter's content (not its mtime, which a copy of the run changes); a full fine-tune's whole model."""
    weights = run.adapter / ADAPTER_WEIGHTS
    if not weights.is_file():  # method full saves the model's weights where LoRA saves its adapter
        weights = run.adapter / MODEL_WEIGHTS
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def _fresh(folder: Path, digest: str) -> bool:
    """Made from this adapter, by a loracls that makes the same graph."""
    try:
        made = json.loads((folder / "loracls_export.json").read_text())
    except (OSError, ValueError):
        return False
    return made.get("adapter_sha256") == digest and made.get("graph_revision", 1) == GRAPH_REVISION


def ensure_export(run: RunDir, quantize: str | None) -> Path:
    """The run's ONNX folder, exported now if it is missing, was made from another adapter or holds an older
    graph.  Processes that open the run at once (servers, torchrun ranks) take turns on a lock: one exports, the
    others find it fresh."""
    folder = onnx_dir(run.path, quantize)
    digest = _adapter_hash(run)  # before loading anything: a newer adapter written meanwhile is not mislabelled
    if _fresh(folder, digest):
        return folder
    import fcntl

    from loracls.atomic import atomic_folder
    from loracls.exports import merged_transformers_model, write_manifest
    from loracls.onnx_export import need_onnx_runtime, write_onnx

    need_onnx_runtime(quantize)
    with open(run.path / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if _fresh(folder, digest):
            return folder
        model, tokenizer = merged_transformers_model(run.path)
        with atomic_folder(folder) as tmp:
            write_manifest(tmp, run, "onnx", **write_onnx(model, tokenizer, tmp, quantize, run=run),
                           adapter_sha256=digest)
    return folder


class OnnxPredictor:
    """A saved run served by ONNX Runtime: texts in, probabilities out."""

    def __init__(self, run_dir, *, backend: str = "onnx", batch_size: int | None = None, threads: int | None = None,
                 concurrent_calls: int = 1):
        """`threads`: ONNX Runtime's threads within one call (None: one per core).  `concurrent_calls`: how many
        threads call outputs() at once (loracls serve's workers)."""
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError:
            raise LoraclsError("ONNX serving needs onnxruntime; pip install 'loracls[onnx]'") from None
        run = RunDir.open(run_dir)
        run.require_model()
        self.run_dir, self.config = run.path, run.read_config()
        self.label_map = Labels(run.read_labels(), run.read_label_values())
        self.backend = backend
        self.batch_size = batch_size or self.config.train.eval_batch_size
        self.task = run_task(run, self.config, self.label_map.names)
        folder = ensure_export(run, ONNX_BACKENDS[backend])
        self.tokenizer = _TokenIds(Tokenizer.from_file(str(folder / "tokenizer.json")))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if concurrent_calls > 1:
            # Without its memory arena, calls from several threads at once run 4-6% faster on one session (MiniLM
            # int8, 2 threads, measured): as fast as a session per thread, at one session's memory.
            options.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # a damaged model.onnx
            raise LoraclsError(f"ONNX Runtime cannot load {folder / 'model.onnx'} ({first_line(e)}); delete "
                               f"{folder} and run again to export it afresh") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        cfg = json.loads((folder / "config.json").read_text())
        self.pad_id = int(cfg.get("pad_token_id") or 0)

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        return tokenize(self.tokenizer, texts, self.config.data.max_length)

    def outputs(self, token_ids: list[list[int]]) -> np.ndarray:
        """The task's outputs [N, K], float32, in input order; batches of similar length, each padded to its
        longest."""
        if not token_ids:
            return np.zeros((0, self.task.outputs(len(self.label_map.names))), dtype=np.float32)
        logits = onnx_logits(self.session, self.inputs, token_ids, self.pad_id, self.batch_size)
        return self.task.activate_np(logits).astype(np.float32, copy=False)


class _TokenIds:
    """A `tokenizers.Tokenizer` called the way loracls.models.tokenize calls a transformers tokenizer, so ONNX
    serving truncates by the one rule training used, without importing transformers: texts, or text pairs (text,
    text_pair) with their token types and the longer text cut first (longest_first, as transformers asks of the
    same Rust tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        tokenizer.no_padding()

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.tokenizer.num_special_tokens_to_add(pair)

    def __call__(self, texts, text_pair=None, *, truncation: bool | str, max_length: int,
                 add_special_tokens: bool = True) -> dict:
        if truncation:
            self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        else:
            self.tokenizer.no_truncation()
        if isinstance(texts, str):
            return {"input_ids": self.tokenizer.encode(texts, add_special_tokens=add_special_tokens).ids}
        if text_pair is None:
            encoded = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            return {"input_ids": [e.ids for e in encoded]}
        encoded = self.tokenizer.encode_batch(list(zip(texts, text_pair)), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded], "token_type_ids": [e.type_ids for e in encoded]}
