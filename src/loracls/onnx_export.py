"""Export a run to ONNX: the merged model as `model.onnx`, with its config (id2label) and tokenizer beside it.

The folder follows optimum's text-classification layout: inputs `input_ids`, `attention_mask` (and
`token_type_ids` for models that use token types: BERT, ELECTRA, ALBERT), output `logits`, batch and sequence
axes dynamic.  optimum's `ORTModelForSequenceClassification` and plain `onnxruntime` load it.  `quantize="int8"`
adds ONNX Runtime's own dynamic quantization (int8 weights, activations quantized on the fly).

The model is traced with PyTorch's TorchScript-based exporter (opset 17), which needs neither onnxscript nor
optimum, with transformers' eager attention: the graph ONNX Runtime's transformer optimizer recognises.  For the
BERT family that optimizer then fuses embeddings + LayerNorm, attention, bias + GELU and residual + LayerNorm
into ONNX Runtime's own kernels (measured here: about 10-20% faster on the CPU than the unfused graph), and the
last layer is reduced to the first token (first_token_last_layer: 1.3x faster fp32 on MiniLM here).  int8
quantizes the weight matrix of every product (INT8_OPS) per output channel (per tensor flipped about twice as many
predictions) to 7 bits (reduce_range): x86 CPUs without VNNI multiply uint8 by int8 in pairs summed into int16,
which saturates with 8-bit weights.  Measured on a full-scale MiniLM run, 2,000 test texts, on this AVX2 CPU:
8-bit weights agreed with fp32 on 99.15% of the predictions, 7-bit on 99.2%; leaving the FFN output projections
in fp32 agreed on 99.6% but was 13% slower.  GELU stays exact: ONNX Runtime's tanh form (FastGelu, optimum's O3
level) measured no faster here (int8, 3,000 test texts, 6 rounds in alternating order: median 16.7 s tanh, 16.8 s
exact).

How far int8 strays from fp32 depends on the run, not only on the graph: a model that is not yet confident has
classes within int8's rounding of each other (MiniLM runs here agreed on 95-99.3% of the predictions).  So an int8
folder is written only after check_int8 has compared it with fp32 on the run's own held-out texts, and refused in
one line below INT8_MIN_AGREEMENT (or with fewer than INT8_MIN_CHECK_TEXTS texts to tell); the agreement and the
number of texts per split go in the manifest.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

from loracls.errors import LoraclsError, first_line, machine_error_message

OPSET = 17
QUANTIZE_CHOICES = ("int8",)
# The ops int8 quantizes: the matrix products.  Not the embedding tables (EmbedLayerNormalization): a lookup gains no
# speed from int8, and quantizing them flipped more predictions (8 MiniLM runs, 1,000 test texts each: 129 flips
# against fp32 with them, 109 without).
INT8_OPS = ["MatMul", "Gemm", "Attention"]
# What write_onnx makes, in a number: raise it whenever the graph changes, so that a run's served folder made by an
# older loracls is exported afresh on its next use (loracls.onnx_inference).  Folders from before the number was written
# hold revision 1; 2: int8 keeps the embedding tables in fp32; 3: an int8 folder is written only once checked
# against fp32 (INT8_MIN_AGREEMENT).
GRAPH_REVISION = 3
# int8 is written only where its predictions equal fp32's on at least this share of the run's held-out texts
# (check_int8): how far int8 strays depends on the run (how confident the model is), so each run is checked.
INT8_MIN_AGREEMENT = 0.99
# The check reads at most this many texts (the first): at 99% agreement 1,000 texts measure it to within 0.3 points
# (one standard error), and MiniLM predicts them twice in about 9 s on 2 cores.
INT8_CHECK_TEXTS = 1000
# Fewer texts certify nothing: a MiniLM run's 26 validation texts all agreed, yet only 98.4% of 1,000 test texts.
INT8_MIN_CHECK_TEXTS = 200


def uses_token_types(model) -> bool:
    """optimum's convention: token_type_ids is an input only where the model has more than one token type."""
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    return takes and int(getattr(model.config, "type_vocab_size", 0) or 0) > 1


def write_onnx(model, tokenizer, folder: Path, quantize: str | None = None, *, run=None) -> dict:
    """Trace `model` (a transformers sequence classifier, eval mode) into folder/model.onnx, quantize it if asked,
    and save its config and tokenizer.  int8 is checked against fp32 on the texts of `run` (a RunDir; see
    check_int8) and refused below INT8_MIN_AGREEMENT.  Returns what the folder's manifest says of the graph."""
    import torch

    if quantize is not None and run is None:
        raise ValueError("write_onnx: int8 is checked on the run's texts; pass run=")
    config = run.read_config() if quantize is not None else None
    check = held_out_texts(config) if quantize is not None else None  # data that cannot be read: refused first

    if not getattr(tokenizer, "is_fast", False):
        raise LoraclsError("ONNX serving needs a fast tokenizer (tokenizer.json), and this model has only a slow "
                           "one; export with --format transformers instead")
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(model) else [])

    class Logits(torch.nn.Module):
        """Positional inputs in `names` order -> logits (what the exporter traces)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).logits

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the plain attention graph, which ORT's optimizer fuses
    sample = tokenizer(["a short text", "a somewhat longer text for tracing the graph"], padding=True,
                       return_tensors="pt")
    args = tuple(sample[n] if n in sample else torch.zeros_like(sample["input_ids"]) for n in names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes["logits"] = {0: "batch_size"}
    fp32 = folder / ("model.onnx" if quantize is None else "model-fp32.onnx")
    try:
        with torch.no_grad(), first_token_last_layer(model), _quiet_tracing():
            # The wrapper is in eval mode too: the exporter restores the mode of the module it was given, and a
            # wrapper left in train mode would put the caller's model back in train mode (dropout on).
            torch.onnx.export(Logits(model.float().eval()).eval(), args, str(fp32), input_names=names,
                              output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except Exception as e:  # an architecture the exporter cannot trace, or a full disk (the CLI words that)
        if machine_error_message(e) is not None:
            raise
        raise LoraclsError(f"PyTorch cannot export this {model.config.model_type} model to ONNX ({first_line(e)}); "
                           "use --format transformers") from None
    fuse_for_ort(fp32, model.config)
    fields = {"inputs": names, "quantize": quantize, "opset": OPSET, "graph_revision": GRAPH_REVISION}
    if quantize == "int8":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _without_preprocessing_advice():
            quantize_dynamic(str(fp32), str(folder / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=INT8_OPS,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # the fused ops' outputs
        from loracls.models import tokenize

        texts, splits = check
        from loracls.tasks import run_task

        task = run_task(run, config, run.read_labels())  # what agreeing means: the same class, labels or value
        fields["int8_check"] = check_int8(fp32, folder / "model.onnx", tokenize(tokenizer, texts,
                                          config.data.max_length)[0], names, tokenizer.pad_token_id or 0, splits,
                                          task)
        fp32.unlink()
    from loracls.exports import save_tokenizer

    model.config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)  # truncating at the run's length: plain tokenizers + onnxruntime take any text
    return fields


def held_out_texts(config) -> tuple[list[str], dict[str, int]]:
    """The texts int8 is checked on, and how many come from each split: the run's validation split as training
    made it (its file, or the share of the training data held out with the run's split seed), then its test data, up to
    INT8_CHECK_TEXTS.  Not the texts the model learned, where it is surer than on new ones (a MiniLM run here: 99.4%
    agreement on 100 validation and 900 training texts, 98.7% on 1,000 test texts), unless the run held none out.
    A held-out split that cannot be read any more is passed over; when none can, a LoraclsError."""
    from loracls.data import held_out, read_examples, read_options

    d = config.data
    kw = read_options(d)
    split_once = {}

    def training_split():
        """(train, validation) as training made them from the training data; read once."""
        if not split_once:
            split_once["split"] = held_out(read_examples(d.train, default_split="train", **kw)[0], d,
                                           config.split_seed)
        return split_once["split"]

    def file_texts(source, split):
        return read_examples(source, default_split=split, require_labels=False, **kw)[0].texts

    candidates = [("validation", (lambda: file_texts(d.validation, "validation")) if d.validation else
                   (lambda: training_split()[1].texts) if d.validation_fraction > 0 else None),
                  ("test", (lambda: file_texts(d.test, "test")) if d.test else None)]
    if not any(read for _, read in candidates):
        candidates = [("train", lambda: training_split()[0].texts)]
    texts, counts, first = [], {}, None
    for split, read in candidates:
        if read is None or len(texts) >= INT8_CHECK_TEXTS:
            continue
        try:
            more = read()[:INT8_CHECK_TEXTS - len(texts)]
        except LoraclsError as e:  # moved, or a hub dataset offline: the next split may still be there
            first = first or e
            continue
        if more:
            texts += more
            counts[split] = len(more)
    if not texts:
        raise LoraclsError(f"int8 is checked against fp32 on the run's held-out texts, and none can be read "
                           f"({first}); make the run's data readable again, or serve fp32 with --backend onnx")
    if len(texts) < INT8_MIN_CHECK_TEXTS:
        raise LoraclsError(f"int8 is checked against fp32 on the run's held-out texts, and it has only {len(texts)} "
                           f"(at least {INT8_MIN_CHECK_TEXTS} are needed); train with a larger --validation-fraction "
                           "or a --test file, or serve fp32 with --backend onnx")
    return texts, counts


def check_int8(fp32: Path, int8: Path, token_ids: list[list[int]], inputs: list[str], pad_id: int,
               splits: dict[str, int], task=None) -> dict:
    """The share of `token_ids` (from `splits`: name -> count) on which the int8 graph answers as fp32 does, as
    `task` (a loracls.tasks.Task; None: single-label) tells: the same class, the same labels over their
    thresholds, or a value within the task's tolerance.  A LoraclsError, which leaves no folder behind, below
    INT8_MIN_AGREEMENT."""
    import time

    from loracls.tasks import get_task

    task = task or get_task(None)
    t0 = time.perf_counter()
    reference, other = (task.activate_np(onnx_outputs(path, token_ids, inputs, pad_id)) for path in (fp32, int8))
    agree = float(task.agreeing(reference, other).mean())
    if agree < INT8_MIN_AGREEMENT:
        where = ", ".join(f"{n:,} {split}" for split, n in splits.items())
        raise LoraclsError(f"int8 agrees with fp32 on only {agree:.1%} of the run's texts ({where}; threshold "
                           f"{INT8_MIN_AGREEMENT:.0%}), so no int8 model was written; serve the fp32 graph with "
                           "--backend onnx, or export --format onnx without --quantize")
    return {"agreement": round(agree, 4), "texts": splits, "threshold": INT8_MIN_AGREEMENT,
            "seconds": round(time.perf_counter() - t0, 2)}


def onnx_outputs(path: Path, token_ids: list[list[int]], inputs: list[str], pad_id: int, batch_size: int = 32):
    """The logits ONNX Runtime's graph at `path` gives each text, in order (fed as loracls.onnx_inference feeds
    it)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return onnx_logits(session, inputs, token_ids, pad_id, batch_size)


def onnx_logits(session, inputs: list[str], token_ids: list[list[int]], pad_id: int, batch_size: int):
    """Logits [N, K], float32, of an ONNX Runtime session whose graph takes `inputs` (of input_ids, attention_mask,
    token_type_ids: a text pair's types, models.PairIds), in input order: batches of similar length, each padded to
    its longest.  Needs numpy alone."""
    import numpy as np

    from loracls.models import token_types

    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    out = None
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids = np.full((len(idx), max(len(token_ids[i]) for i in idx)), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)  # padding: type 0
        for row, i in enumerate(idx):
            ids[row, :len(token_ids[i])] = token_ids[i]
            mask[row, :len(token_ids[i])] = 1
            if "token_type_ids" in inputs:
                types[row, :len(token_ids[i])] = token_types(token_ids[i])
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        logits = session.run(["logits"], {n: feed[n] for n in inputs})[0].astype(np.float32)
        if out is None:
            out = np.empty((len(token_ids), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out


@contextlib.contextmanager
def _quiet_tracing():
    """The tracer warns wherever transformers' code branches on a shape (mask padding, position ids), and the
    exporter about negative indices that this code never produces.  Both are checked instead: the tests compare the
    exported logits with PyTorch's on batches of other lengths, for every family.  A user's terminal is spared."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        yield


@contextlib.contextmanager
def _without_preprocessing_advice():
    """quantize_dynamic logs, on the root logger, advice to run its pre-processing (shape inference and graph
    optimization) on any model not marked as pre-processed.  fuse_for_ort has already optimized the graph for
    ONNX Runtime, so the advice would only be noise in a user's terminal; other records pass."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@contextlib.contextmanager
def first_token_last_layer(model):
    """While tracing, the last encoder layer computes only the first token's output, where the family's head reads
    only that token (HeadLayout: out(tanh(dense(h0))); BERT's pooler and RoBERTa's head).  Exact, not an
    approximation: that token's output needs every token's key and value, but no other token's query, attention
    output or FFN, which are 5/6 of the layer's matrix products (the fast backend does the same).  The other
    layers stay transformers' own code, so ONNX Runtime's optimizer still fuses them."""
    from loracls.families import family_of

    fam = family_of(model.config)
    # Only the families whose layers are BERT's own code and whose head reads the first token alone
    reducible = fam is not None and fam.head is not None and fam.ort_fusion == "bert" and fam.prefix is not None
    layers = getattr(getattr(model, fam.prefix, None), "encoder", None) if reducible else None
    if layers is None:
        yield
        return
    last = layers.layer[-1]
    layers.layer[-1] = first_token_layer(last, fam, model.config.num_attention_heads)
    try:
        yield
    finally:
        layers.layer[-1] = last


def first_token_layer(layer, fam, heads: int):
    """A BERT-layout layer (attention.self.{query,key,value}, attention.output, intermediate, output) whose
    output is [B, 1, H]: the first token only.  Takes the additive mask transformers' eager attention gets.  The
    layer's modules keep their names in the graph."""
    import torch

    class FirstTokenLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def module(self, alias: str, parent: bool = False):
            path = fam.targets[alias].path
            return self.layer.get_submodule(path.rsplit(".", 1)[0] if parent else path)

        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            B, L, H = hidden_states.shape
            d = H // heads
            h0 = hidden_states[:, :1]
            q = self.module("query")(h0).view(B, 1, heads, d).transpose(1, 2)
            k, v = (self.module(a)(hidden_states).view(B, L, heads, d).transpose(1, 2) for a in ("key", "value"))
            scores = q @ k.transpose(-1, -2) * d ** -0.5
            if attention_mask is not None:
                scores = scores + attention_mask[..., :1, :]  # the first query's row of the mask
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, 1, H)
            attended = self.module("attention-output", parent=True)(context, h0)
            return self.module("ffn-out", parent=True)(self.module("ffn-in", parent=True)(attended), attended)

    return FirstTokenLayer()


def fuse_for_ort(path: Path, config) -> None:
    """ONNX Runtime's transformer optimizer on a family it has fusions for (in place); other families keep the
    plain graph, which ONNX Runtime still optimises generically when it loads it."""
    from loracls.families import family_of

    fam = family_of(config)
    if fam is None or fam.ort_fusion is None:
        return
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(str(path), model_type=fam.ort_fusion, num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=1)
    optimized.save_model_to_file(str(path))


def export_onnx(run_dir: str | Path, output: str | Path, *, quantize: str | None = None,
                overwrite: bool = False) -> Path:
    """`loracls export --format onnx`: a folder that plain onnxruntime (or optimum) serves without loracls."""
    from loracls.exports import export_folder, write_manifest

    need_onnx_runtime(quantize)
    with export_folder(run_dir, output, overwrite=overwrite) as (run, model, tokenizer, tmp):
        write_manifest(tmp, run, "onnx", **write_onnx(model, tokenizer, tmp, quantize, run=run))
    return Path(output).absolute()


def need_onnx_runtime(quantize: str | None) -> None:
    """onnx and onnxruntime are an optional extra: say how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraclsError(f"ONNX needs {' and '.join(missing)}; pip install 'loracls[onnx]'")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise LoraclsError(f"unknown quantization {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}")
