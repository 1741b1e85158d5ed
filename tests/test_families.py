"""Every encoder family in loracls.families, on tiny random models built from configs, against PEFT itself.

For each family: `plan` equals PEFT's own count of the same LoRA on the real model; one training step changes
only the trainables; PEFT reloads the saved adapter with equal logits; both the default targets and all-linear
work; and end to end through the CLI it trains, predicts, exports (pipeline() predicts the same labels) and
reloads.  The reference module names below are written out here, not taken from loracls.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from helpers import build_model, onnx_logits, save_adapter, softmax, train_args
from loracls.cli import main
from loracls.config import LoraSettings
from loracls.models import read_model_config
from loracls.planning import count

TEXTS = ["Stocks rallied on Wall Street after the bank kept rates unchanged.", "The team won the final.",
         "A new chip doubles the speed of phones while using less power, the company said on Monday.", "Oil"]

# family -> (transformers config class and kwargs, tokenizer kind, PEFT module names of q/k/v, head modules,
#            regex of an encoder layer's linears)
FAMILIES = {
    "bert": ("BertConfig", {}, "wordpiece", ["attention.self.query", "attention.self.key", "attention.self.value"],
             ["classifier"], r"bert\.encoder\.layer\.\d+\."),
    "roberta": ("RobertaConfig", {"max_position_embeddings": 130, "type_vocab_size": 1}, "bpe",
                ["attention.self.query", "attention.self.key", "attention.self.value"], ["classifier"],
                r"roberta\.encoder\.layer\.\d+\."),
    "xlm-roberta": ("XLMRobertaConfig", {"max_position_embeddings": 130, "type_vocab_size": 1}, "bpe",
                    ["attention.self.query", "attention.self.key", "attention.self.value"], ["classifier"],
                    r"roberta\.encoder\.layer\.\d+\."),
    "distilbert": ("DistilBertConfig", {}, "wordpiece", ["q_lin", "k_lin", "v_lin"], ["pre_classifier", "classifier"],
                   r"distilbert\.transformer\.layer\.\d+\."),
    "electra": ("ElectraConfig", {"embedding_size": 16}, "wordpiece",
                ["attention.self.query", "attention.self.key", "attention.self.value"], ["classifier"],
                r"electra\.encoder\.layer\.\d+\."),
    "deberta-v2": ("DebertaV2Config", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                       "position_biased_input": False, "max_relative_positions": -1}, "wordpiece",
                   ["query_proj", "key_proj", "value_proj"], ["pooler", "classifier"],
                   r"deberta\.encoder\.layer\.\d+\."),
    "modernbert": ("ModernBertConfig", {}, "wordpiece", ["Wqkv"], ["head", "classifier"], r"model\.layers\.\d+\."),
    "albert": ("AlbertConfig", {"embedding_size": 16}, "wordpiece",
               ["attention.query", "attention.key", "attention.value"], ["classifier"],
               r"albert\.encoder\.albert_layer_groups\.\d+\.albert_layers\.\d+\."),
    "mpnet": ("MPNetConfig", {"max_position_embeddings": 130}, "bpe", ["attn.q", "attn.k", "attn.v"], ["classifier"],
              r"mpnet\.encoder\.layer\.\d+\."),
}
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="session")
def tokenizers(minilm_dir, tiny_roberta_dir):
    """MiniLM's WordPiece, and the byte-level BPE the tiny RoBERTa fixture trained (trained once per session)."""
    from transformers import AutoTokenizer

    return {"wordpiece": AutoTokenizer.from_pretrained(str(minilm_dir)),
            "bpe": AutoTokenizer.from_pretrained(str(tiny_roberta_dir))}


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tmp_path_factory, tokenizers):
    """(name, model folder): a 2-layer, hidden-32 random encoder of the family with a tokenizer."""
    import transformers
    from transformers import AutoModel

    name = request.param
    cls_name, extra, tok_kind, *_ = FAMILIES[name]
    tokenizer = tokenizers[tok_kind]
    special = {"pad_token_id": tokenizer.pad_token_id}
    if name == "modernbert":
        special.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64} if name == "distilbert" else SIZES
    try:
        cfg = getattr(transformers, cls_name)(vocab_size=len(tokenizer), **sizes, **special, **extra)
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg)
    except Exception as e:  # a family this transformers version cannot build: skipped, with the reason
        pytest.skip(f"transformers {transformers.__version__} cannot build {name}: {e}")
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name, folder


def _peft_reference_count(folder: Path, name: str, lora: LoraSettings, all_linear: bool) -> int:
    """PEFT's own trainable count on the real model, with the module names written out above."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    _, _, _, qkv, head, layer = FAMILIES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=4)
    if all_linear:
        targets = rf".*{layer}.*" if name != "albert" else rf".*{layer}.*"
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.match(targets, n)]
    else:
        targets = qkv
    config = LoraConfig(task_type="SEQ_CLS", r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                        modules_to_save=list(head))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).get_nb_trainable_parameters()[0]


def _logits(model, folder):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))(TEXTS)["input_ids"]
    with torch.no_grad():
        return model.eval()(model.collate(ids))


@pytest.mark.parametrize("targets", ["default", "all-linear"])
def test_plan_step_and_peft_reload(family, targets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name, folder = family
    lora = LoraSettings(rank=3, alpha=6, dropout=0.1) if targets == "default" else \
        LoraSettings(rank=3, alpha=6, dropout=0.1, targets=["all-linear"])
    plan = count(read_model_config(str(folder)), 4, lora)
    assert plan.trainable == _peft_reference_count(folder, name, lora, targets == "all-linear")

    model = build_model(folder, "peft", lora)
    trainable = dict(model.trainable_named_parameters())
    assert sum(p.numel() for p in trainable.values()) == plan.trainable
    # one step changes exactly the trainables
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = {id(p) for p in trainable.values()}
    trainable_keys = {k for k, v in model.named_parameters() if id(v) in ids}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    tok = AutoTokenizer.from_pretrained(str(folder))
    for _ in range(2):  # step 1 moves B off zero, so step 2 moves A too
        loss = torch.nn.functional.cross_entropy(model.train()(model.collate(tok(TEXTS)["input_ids"])),
                                                 torch.tensor([0, 1, 2, 3]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable_keys, changed ^ trainable_keys
    # PEFT reads the adapter with the same logits
    expected = _logits(model, folder)
    save_adapter(model, lora, tmp_path, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=4)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, expected, atol=1e-5, rtol=1e-4)


def test_cli_end_to_end(family, tmp_path, capsys):
    """train -> predict -> export; pipeline() on the export predicts what `loracls predict` predicts."""
    from transformers import pipeline

    name, folder = family
    data = tmp_path / "d.csv"
    rows = [f"{'great fine good' if i % 2 else 'awful poor bad'} text {i},{'pos' if i % 2 else 'neg'}" for i in range(24)]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(train_args(folder, data, run, "--epochs", "1", "--max-length", "24", "--lr", "5e-3")) == 0
    err = capsys.readouterr().err
    expected_backend = "fast" if name in ("bert", "roberta", "xlm-roberta") else "peft"
    assert f"backend auto -> {expected_backend}" in err
    if expected_backend == "peft":
        assert "fast cannot:" in err  # auto says why it fell back
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), "--input", str(data), "--output", str(out)]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(ours) == 24
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    clf = pipeline("text-classification", model=str(tmp_path / "export"), device="cpu")
    theirs = clf([r.split(",")[0] for r in rows], truncation=True)
    assert [t["label"] for t in theirs] == [r["label"] for r in ours]
    for t, r in zip(theirs, ours):
        assert abs(t["score"] - r["probs"][r["label"]]) < 1e-4
    # The ONNX export, read by plain onnxruntime with transformers' tokenizer: the same probabilities
    assert main(["export", str(run), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    logits, names = onnx_logits(tmp_path / "onnx", [r.split(",")[0] for r in rows], truncation=True, max_length=24)
    assert names[:2] == ["input_ids", "attention_mask"]
    ours_probs = [[r["probs"][k] for k in r["probs"]] for r in ours]
    assert abs(softmax(logits) - ours_probs).max() < 1e-4
