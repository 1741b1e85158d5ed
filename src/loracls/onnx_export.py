"""Export a run to ONNX: the merged model as `model.onnx`, with its config (id2label) and tokenizer beside it.

The folder follows optimum's text-classification layout: inputs `input_ids`, `attention_mask` (and
`token_type_ids` for models that use token types: BERT, ELECTRA, ALBERT), output `logits`, batch and sequence
axes dynamic.  optimum's `ORTModelForSequenceClassification` and plain `onnxruntime` load it.  `quantize="int8"`
adds ONNX Runtime's own dynamic quantization (int8 weights, activations quantized on the fly).

The model is traced with PyTorch's TorchScript-based exporter (opset 17), which needs neither onnxscript nor
optimum, with transformers' eager attention: the graph ONNX Runtime's transformer optimizer recognises.  For the
BERT family that optimizer then fuses embeddings + LayerNorm, attention, bias + GELU and residual + LayerNorm
into ONNX Runtime's own kernels (measured here: about 10-20% faster on the CPU than the unfused graph).  int8
quantizes the weights per output channel (per tensor flipped about twice as many predictions), and keeps the FFN
output projections in fp32 (see ffn_out_nodes).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from loracls.errors import LoraclsError, first_line

OPSET = 17
QUANTIZE_CHOICES = ("int8",)


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
        with torch.no_grad():
            torch.onnx.export(Logits(model.float().eval()), args, str(fp32), input_names=names,
                              output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except Exception as e:  # an architecture the exporter cannot trace
        raise LoraclsError(f"PyTorch cannot export this {model.config.model_type} model to ONNX ({first_line(e)}); "
                           "use --format transformers") from None
    fuse_bert(fp32, model.config)
    if quantize == "int8":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(folder / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=ffn_out_nodes(onnx.load(str(fp32)), model.config),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # the fused ops' outputs
        fp32.unlink()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return names


def ffn_out_nodes(graph_model, config) -> list[str]:
    """The FFN output projections, kept in fp32 under int8: their input, after GELU, is heavy-tailed, and its
    8-bit rounding flipped most of the predictions that int8 changed (measured on MiniLM: 97% -> 99% agreement)."""
    from loracls.families import family_of

    fam = family_of(config)
    if fam is None or "ffn-out" not in fam.targets:
        return []
    path = "/" + fam.targets["ffn-out"].path.replace(".", "/") + "/"
    attention = "/" + fam.targets["attention-output"].path.replace(".", "/") + "/"
    return [n.name for n in graph_model.graph.node if n.op_type in ("MatMul", "Gemm") and path in n.name
            and attention not in n.name]


def fuse_bert(path: Path, config) -> None:
    """ONNX Runtime's transformer optimizer on a BERT-family graph (in place); other families keep the plain graph,
    which ONNX Runtime still optimises generically when it loads it."""
    from loracls.families import family_of

    fam = family_of(config)
    if fam is None or not fam.fast:  # the BERT layout the optimizer's "bert" patterns match
        return
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=1)
    optimized.save_model_to_file(str(path))


def export_onnx(run_dir: str | Path, output: str | Path, *, quantize: str | None = None,
                overwrite: bool = False) -> Path:
    """`loracls export --format onnx`: a folder that plain onnxruntime (or optimum) serves without loracls."""
    from loracls.exports import export_folder, write_manifest

    need_onnx_runtime(quantize)
    with export_folder(run_dir, output, overwrite=overwrite) as (run, model, tokenizer, tmp):
        names = write_onnx(model, tokenizer, tmp, quantize)
        write_manifest(tmp, run, "onnx", inputs=names, quantize=quantize, opset=OPSET)
    return Path(output).absolute()


def need_onnx_runtime(quantize: str | None) -> None:
    """onnx and onnxruntime are an optional extra: say how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraclsError(f"ONNX needs {' and '.join(missing)}; pip install 'loracls[onnx]'")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise LoraclsError(f"unknown quantization {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}")
