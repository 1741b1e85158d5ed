"""Model types with no row in loracls.families: their targets are inferred from the model's own layers.

On tiny random models of types the table does not name (BERT-like and not), with the default targets: `plan`
equals PEFT's own count on the real model (the module names written out here, not taken from loracls), and end to
end through the CLI the run trains, says which targets it inferred, PEFT reloads the adapter with the probabilities
`loracls predict` gives, and the export predicts the same through transformers' pipeline().  A model whose layers
hold no nn.Linear, or whose attention cannot be identified, fails with one line naming the linears it has.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from helpers import peft_logits, softmax, train_args
from loracls.cli import main
from loracls.config import LoraSettings
from loracls.models import read_model_config
from loracls.planning import count
from test_families import SIZES, tokenizers  # noqa: F401  (a fixture: MiniLM's WordPiece and a tiny BPE)

# model type -> (config kwargs beyond SIZES, tokenizer kind, PEFT names of q/k/v, head modules, the inferred
#                mapping `plan` prints)
BERT_LIKE = "query=attention.self.query, key=attention.self.key, value=attention.self.value, " \
            "attention-output=attention.output.dense, ffn-in=intermediate.dense, ffn-out=output.dense"
QKV = ["attention.self.query", "attention.self.key", "attention.self.value"]
TYPES = {
    "ernie": ({}, "wordpiece", QKV, ["classifier"], BERT_LIKE),
    "roformer": ({}, "wordpiece", QKV, ["classifier"], BERT_LIKE),
    "megatron-bert": ({}, "wordpiece", QKV, ["classifier"], BERT_LIKE),
    "data2vec-text": ({"max_position_embeddings": 130}, "bpe", QKV, ["classifier"], BERT_LIKE),
    "nystromformer": ({}, "wordpiece", QKV, ["classifier"], BERT_LIKE),
    # not BERT-like: one fused q/k/v projection; XLM's parallel lists of attention and FFN blocks; Llama-style names
    "deberta": ({}, "wordpiece", ["attention.self.in_proj"], ["pooler", "classifier"],
                "query=attention.self.in_proj, key=attention.self.in_proj, value=attention.self.in_proj, "
                "attention-output=attention.output.dense, ffn-in=intermediate.dense, ffn-out=output.dense"),
    "xlm": ({"emb_dim": 32, "n_layers": 2, "n_heads": 4}, "wordpiece", ["q_lin", "k_lin", "v_lin"],
            ["sequence_summary"],
            "query=q_lin, key=k_lin, value=v_lin, attention-output=out_lin, ffn-in=lin1, ffn-out=lin2"),
    # an encoder-decoder: LoRA in the encoder's layers, though the decoder's hold more linears (cross-attention)
    "bart": ({"decoder_layers": 2, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}, "bpe",
             [f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")],
             ["classification_head"],
             "query=self_attn.q_proj, key=self_attn.k_proj, value=self_attn.v_proj, "
             "attention-output=self_attn.out_proj, ffn-in=fc1, ffn-out=fc2"),
    "eurobert": ({}, "wordpiece", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["dense", "classifier"],
                 "query=self_attn.q_proj, key=self_attn.k_proj, value=self_attn.v_proj, "
                 "attention-output=self_attn.o_proj, ffn-out=mlp.down_proj"),
}
TEXTS = [f"{'great fine good' if i % 2 else 'awful poor bad'} text {i}" for i in range(24)]


def _tiny(model_type: str, tokenizer, folder, **extra):
    """A 2-layer, hidden-32 random encoder of `model_type` with `tokenizer`, saved in `folder`."""
    import transformers
    from transformers import AutoConfig, AutoModel

    special = {"pad_token_id": tokenizer.pad_token_id}
    special.update({k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id")  # BART finds its eos tokens
                    if getattr(tokenizer, k) is not None})
    try:
        cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **SIZES, **special, **extra)
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg)
    except Exception as e:  # a type this transformers version cannot build: skipped, with the reason
        pytest.skip(f"transformers {transformers.__version__} cannot build {model_type}: {e}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=list(TYPES))
def unlisted(request, tmp_path_factory, tokenizers):  # noqa: F811
    name = request.param
    extra, kind, *_ = TYPES[name]
    return name, _tiny(name, tokenizers[kind], tmp_path_factory.mktemp(name), **extra)


def _peft_count(folder, name: str, lora: LoraSettings) -> int:
    """PEFT's own trainable count on the real model, with the q/k/v and head names written out above."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    _, _, qkv, head, _ = TYPES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=4)
        config = LoraConfig(task_type="SEQ_CLS", r=lora.rank, lora_alpha=lora.alpha, target_modules=qkv,
                            modules_to_save=list(head))
        return get_peft_model(model, config).get_nb_trainable_parameters()[0]


def test_plan_counts_what_peft_counts(unlisted, capsys):
    name, folder = unlisted
    lora = LoraSettings(rank=3, alpha=6)
    assert count(read_model_config(str(folder)), 4, lora).trainable == _peft_count(folder, name, lora)
    assert main(["plan", "--model", str(folder), "--num-labels", "4"]) == 0
    out = capsys.readouterr().out
    assert f"note: model type {name!r} has no row in loracls' table; targets inferred from its layers: " \
           f"{TYPES[name][4]}" in out


def test_train_reload_in_peft_and_export(unlisted, tmp_path, capsys):
    from transformers import pipeline

    name, folder = unlisted
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(TEXTS)))
    run = tmp_path / "run"
    assert main(train_args(folder, data, run, "--epochs", "1", "--max-length", "24", "--lr", "5e-3")) == 0
    err = capsys.readouterr().err
    assert "backend auto -> peft (fast cannot:" in err
    assert f"loracls: note: model type {name!r} has no row in loracls' table; targets inferred" in err
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), "--input", str(data), "--output", str(out)]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    ours_probs = np.array([list(r["probs"].values()) for r in ours])  # in the order of the head's outputs
    theirs = softmax(peft_logits(folder, run / "adapter", TEXTS, max_length=24, num_labels=2))
    assert abs(theirs - ours_probs).max() < 1e-4
    assert not np.allclose(theirs, theirs[:1])  # the model tells the texts apart: a real comparison
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    clf = pipeline("text-classification", model=str(tmp_path / "export"), device="cpu")
    for t, r in zip(clf(TEXTS, truncation=True, max_length=24), ours):
        assert t["label"] == r["label"] and abs(t["score"] - r["probs"][r["label"]]) < 1e-4


@pytest.mark.parametrize("name, extra, linears", [
    # SqueezeBERT's layers are Conv1d, I-BERT's quantized linears: no nn.Linear for LoRA in either
    ("squeezebert", {"embedding_size": 32}, "transformer.pooler.dense (32->32)"),
    # FNet mixes tokens by a Fourier transform: no attention, so no query (its FFN is still inferred)
    ("fnet", {}, "intermediate.dense (32->64), output.dense (64->32)"),
])
def test_uninferable_targets_name_the_linears(name, extra, linears, tokenizers, tmp_path, capsys):  # noqa: F811
    folder = _tiny(name, tokenizers["wordpiece"], tmp_path / name, **extra)
    capsys.readouterr()
    assert main(["plan", "--model", str(folder), "--num-labels", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and linears in err, err
    if name == "fnet":  # the targets that were inferred work
        assert main(["plan", "--model", str(folder), "--num-labels", "4", "--targets", "ffn-in,ffn-out"]) == 0
        assert "LoRA ffn-in" in capsys.readouterr().out


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "distilbert", "deberta-v2", "mpnet",
                                        "modernbert"])
def test_inference_finds_what_the_table_says(model_type):
    """The table's rows are hand-written facts: inference, blind to them, finds the same module for each target
    (ALBERT's shared layer groups are the one layout it does not read)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from loracls.families import family_of
    from loracls.target_inference import infer_family

    sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64} if model_type == "distilbert" else SIZES
    cfg = AutoConfig.for_model(model_type, vocab_size=100, pad_token_id=0, **sizes)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(cfg)
    inferred, row = infer_family(model), family_of(cfg)
    assert {a: t.path for a, t in inferred.targets.items()} == {a: t.path for a, t in row.targets.items()}
    assert re.fullmatch(inferred.layer_regex, row.layer.format(1)).group(1) == "1"


def test_a_decoder_saved_without_a_padding_token_pads_with_its_end_of_sequence_token(tokenizers, tmp_path,  # noqa: F811
                                                                                       capsys):
    """Llama, Mistral and most decoders ship with no pad token in config or tokenizer; transformers' classification
    head of a decoder reads the last token that is not padding and refuses batches without one.  The run pads with
    the end-of-sequence token, and the export carries it: pipeline() in batches gives the run's own predictions."""
    import copy

    from transformers import LlamaConfig, LlamaModel, pipeline

    tokenizer = copy.deepcopy(tokenizers["bpe"])
    tokenizer.pad_token = None
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, pad_token_id=None,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    LlamaModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(TEXTS)))
    run = tmp_path / "run"
    assert main(train_args(folder, data, run, "--epochs", "1", "--max-length", "24", "--batch-size", "8")) == 0
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), "--input", str(data), "--output", str(out)]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["pad_token_id"] == tokenizer.eos_token_id
    clf = pipeline("text-classification", model=str(tmp_path / "export"), device="cpu")
    theirs = clf(TEXTS, truncation=True, max_length=24, batch_size=8)  # padded batches: the pad token is needed
    assert [t["label"] for t in theirs] == [r["label"] for r in ours]
    assert max(abs(t["score"] - r["probs"][r["label"]]) for t, r in zip(theirs, ours)) < 1e-4


def test_a_module_name_the_refusal_lists_is_taken_as_a_target(tokenizers, tmp_path, capsys):  # noqa: F811
    """Funnel's attention has no query/key/value names; the refusal lists its linears relative to a block, some
    starting with an index ('0.attention.q_head'), and that name is then taken: counted as PEFT counts it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, FunnelConfig, FunnelModel

    tokenizer = tokenizers["wordpiece"]
    cfg = FunnelConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, block_sizes=[2, 2], d_model=32,
                       n_head=4, d_head=8, d_inner=64)
    torch.manual_seed(0)
    FunnelModel(cfg).save_pretrained(tmp_path / "funnel")  # AutoModel.from_config cannot build funnel
    tokenizer.save_pretrained(tmp_path / "funnel")
    assert main(["plan", "--model", str(tmp_path / "funnel"), "--num-labels", "4"]) == 2
    assert "0.attention.q_head (32->32)" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "funnel"), "--num-labels", "4", "--rank", "3",
                 "--targets", "0.attention.q_head"]) == 0
    total = re.search(r"total trainable\s+([\d,]+)", capsys.readouterr().out).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "funnel"), num_labels=4)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=3, target_modules=["0.attention.q_head"],
                                            modules_to_save=["classifier"]))
    assert int(total.replace(",", "")) == peft.get_nb_trainable_parameters()[0]
    assert main(["plan", "--model", str(tmp_path / "funnel"), "--num-labels", "4", "--targets", "3"]) == 2


def test_a_model_that_cannot_classify_a_batch_is_refused_in_one_line(tokenizers, tmp_path, capsys):  # noqa: F811
    """X-MOD built without a default language raises in its forward; the run says so before training, in one line
    with transformers' own reason, and leaves no run behind."""
    folder = _tiny("xmod", tokenizers["bpe"], tmp_path / "xmod")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(TEXTS)))
    capsys.readouterr()
    assert main(train_args(folder, data, tmp_path / "run", "--epochs", "1", "--max-length", "24")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("loracls: data:")]
    assert len(err) == 1 and "cannot classify a padded batch" in err[0] and "set_default_language" in err[0], err
    assert not (tmp_path / "run").exists()
