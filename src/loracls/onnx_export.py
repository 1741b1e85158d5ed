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
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

from loracls.errors import LoraclsError, first_line

OPSET = 17
QUANTIZE_CHOICES = ("int8",)
# The ops int8 quantizes: the matrix products.  Not the embedding tables (EmbedLayerNormalization): a lookup gains no
# speed from int8, and quantizing them flipped more predictions (8 MiniLM runs, 1,000 test texts each: 129 flips
# against fp32 with them, 109 without).
INT8_OPS = ["MatMul", "Gemm", "Attention"]
# What write_onnx makes, in a number: raise it whenever the graph changes, so that a run's served folder made by an
# older loracls is exported afresh on its next use (loracls.serve).  Folders from before the number was written
# hold revision 1; 2: int8 keeps the embedding tables in fp32.
GRAPH_REVISION = 2


def uses_token_types(model) -> bool:
    """optimum's convention: token_type_ids is an input only where the model has more than one token type."""
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    return takes and int(getattr(model.config, "type_vocab_size", 0) or 0) > 1


def write_onnx(model, tokenizer, folder: Path, quantize: str | None = None) -> list[str]:
    """Trace `model` (a transformers sequence classifier, eval mode) into folder/model.onnx, quantize it if asked,
    and save its config and tokenizer.  Returns the graph's input names."""
    import torch

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
            torch.onnx.export(Logits(model.float().eval()), args, str(fp32), input_names=names,
                              output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except OSError:
        raise  # a full disk or a permission, not the architecture: the CLI words it
    except Exception as e:  # an architecture the exporter cannot trace
        raise LoraclsError(f"PyTorch cannot export this {model.config.model_type} model to ONNX ({first_line(e)}); "
                           "use --format transformers") from None
    fuse_for_ort(fp32, model.config)
    if quantize == "int8":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _without_preprocessing_advice():
            quantize_dynamic(str(fp32), str(folder / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=INT8_OPS,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # the fused ops' outputs
        fp32.unlink()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return names


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
        write_manifest(tmp, run, "onnx", **manifest_fields(write_onnx(model, tokenizer, tmp, quantize), quantize))
    return Path(output).absolute()


def manifest_fields(inputs: list[str], quantize: str | None) -> dict:
    """What an ONNX folder's loracls_export.json says of the graph, besides what every export says."""
    return {"inputs": inputs, "quantize": quantize, "opset": OPSET, "graph_revision": GRAPH_REVISION}


def need_onnx_runtime(quantize: str | None) -> None:
    """onnx and onnxruntime are an optional extra: say how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraclsError(f"ONNX needs {' and '.join(missing)}; pip install 'loracls[onnx]'")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise LoraclsError(f"unknown quantization {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}")
