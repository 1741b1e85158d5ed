"""Text pairs (issue 24): read from two columns or found by a header, tokenized as the tokenizer's own pair, and fed
with their token types to both backends and to ONNX Runtime.  The references are transformers' tokenizer(a, b,
truncation="longest_first"), AutoModelForSequenceClassification + PEFT given the same input ids, token types and
attention mask, and the GLUE files themselves."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import build_model
from loracls.backends.fast import CPU as CPU_POLICY
from loracls.backends.fast import CUDA as CUDA_POLICY
from loracls.backends.fast import packing
from loracls.config import DataSettings, LoraSettings, RunConfig
from loracls.data import load_splits, read_examples, read_options, resolved_columns, summary, summary_lines
from loracls.errors import LoraclsError
from loracls.models import PairIds, load_tokenizer, token_types, tokenize

WORDS = ("the bank kept its rates while markets rallied and the team won a final after rain delayed the match in "
         "the city where new chips double the speed of phones").split()


def _text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _pairs() -> list[tuple[str, str]]:
    """Pairs of every shape for max_length 16 to 40: short, one long, both long (each longer than the 32 characters
    per token models.tokenize cuts at, the longer in characters also longer in tokens), empty texts, and lengths
    that make the budget odd and even."""
    import random

    rng = random.Random(0)
    pairs = [(_text(rng, rng.randint(1, 30)), _text(rng, rng.randint(1, 30))) for _ in range(40)]
    pairs += [("Oil", "Rain."), ("", "only the second text"), ("only the first text", ""),
              (_text(rng, 400), "a short hypothesis"), ("a short premise", _text(rng, 400)),
              (_text(rng, 300), _text(rng, 320)), (_text(rng, 330), _text(rng, 300)),
              ("x" * 3000 + " end", "a 3000-character word is one [UNK] to BERT: its cut is made longer")]
    return pairs


PAIRS = _pairs()
# BERT's module names of the six linear targets, written out here for the reference PEFT model.
PATHS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
         "attention-output": "attention.output.dense", "ffn-in": "intermediate.dense", "ffn-out": "output.dense"}
SIX = LoraSettings(rank=4, alpha=8.0, dropout=0.1, targets=list(PATHS))


def _reference_encoding(model_dir, pairs, max_length, **options):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length,
               **options)


# -- tokenization ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_length", [16, 25, 40])
def test_pair_ids_are_the_tokenizers_pairs(tiny_model_dir, max_length):
    ids, truncated = tokenize(load_tokenizer(str(tiny_model_dir)), PAIRS, max_length)
    ref = _reference_encoding(tiny_model_dir, PAIRS, max_length)
    assert ids == ref["input_ids"]
    whole = _reference_encoding(tiny_model_dir, PAIRS, 100_000)["input_ids"]
    assert truncated == sum(len(x) > max_length for x in whole) > 0
    if "token_type_ids" in ref:  # BERT: [CLS] a [SEP] b [SEP], the second text of type 1
        assert [token_types(x) for x in ids] == ref["token_type_ids"]
        assert all(isinstance(x, PairIds) for x in ids)
    else:  # RoBERTa's tokenizer gives no token types: plain lists, every type 0
        assert not any(isinstance(x, PairIds) for x in ids)


def test_single_texts_and_pairs_mix_in_order(tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    texts = ["a single text", PAIRS[0], "another one", PAIRS[-1]]
    ids, _ = tokenize(load_tokenizer(str(tiny_bert_dir)), texts, 24)
    assert ids[0] == tok("a single text")["input_ids"] and type(ids[0]) is list and token_types(ids[0]) == [0] * 5
    assert ids[1] == tok(*PAIRS[0], truncation="longest_first", max_length=24)["input_ids"]
    assert ids[3] == tok(*PAIRS[-1], truncation="longest_first", max_length=24)["input_ids"]
    with pytest.raises(LoraclsError, match="neither a text nor a pair"):
        tokenize(tok, ["fine", ("a", "b", "c")], 24)
    with pytest.raises(LoraclsError, match="--max-length 4 or more"):  # [CLS] [SEP] [SEP] leave no room
        tokenize(tok, [PAIRS[0]], 3)


def test_onnx_serving_tokenizer_encodes_pairs_the_same_way(tiny_model_dir):
    """serve._TokenIds (the `tokenizers` library alone, as ONNX serving runs) gives transformers' ids and types."""
    from tokenizers import Tokenizer

    from loracls.onnx_inference import _TokenIds

    served = _TokenIds(Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")))
    ref = _reference_encoding(tiny_model_dir, PAIRS, 25)
    ids, _ = tokenize(served, PAIRS, 25)
    assert ids == ref["input_ids"]
    assert [token_types(x) for x in ids] == ref.get("token_type_ids", [[0] * len(x) for x in ids])


# -- both backends against transformers + PEFT -------------------------------------------------------------------

def _peft_model(model_dir):
    """transformers + PEFT with LoRA on the six linears, random B and head: the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4)
    regex = rf".*\.layer\.\d+\.(?:{'|'.join(re.escape(p) for p in PATHS.values())})"
    pm = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=SIX.rank, lora_alpha=SIX.alpha,
                                         lora_dropout=SIX.dropout, target_modules=regex)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or ("classifier" in name and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


@pytest.mark.parametrize("backend,grouping", [("peft", None), ("fast", "one-group"), ("fast", "per-length"),
                                              ("fast", "cuda")])
def test_backends_on_pairs_match_transformers_and_peft(tiny_model_dir, backend, grouping, monkeypatch):
    from peft import get_peft_model_state_dict

    pairs = PAIRS[:12] + PAIRS[-5:]  # ragged: 6 to 40 tokens
    pm = _peft_model(tiny_model_dir)
    enc = _reference_encoding(tiny_model_dir, pairs, 40, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = pm(**enc).logits
        if "token_type_ids" in enc:  # the types matter: all 0 would give other logits
            zeros = pm(**{**enc, "token_type_ids": torch.zeros_like(enc["token_type_ids"])}).logits
            assert (zeros - ref).abs().max() > 1e-2

    policy = {"cuda": CUDA_POLICY}.get(grouping, CPU_POLICY)  # the CUDA policy (bf16, one group) runs on the CPU
    if grouping == "one-group":
        monkeypatch.setattr(packing, "GROUP_COST", float("inf"))
    elif grouping == "per-length":  # sorted by length into groups: packed order differs from the caller's
        monkeypatch.setattr(packing, "GROUP_COST", 0.0)
    model = build_model(tiny_model_dir, backend, SIX, **({"policy": policy} if backend == "fast" else {}))
    model.load_adapter_state_dict(get_peft_model_state_dict(pm))
    model.eval()
    ids, _ = tokenize(load_tokenizer(str(tiny_model_dir)), pairs, 40)
    tol = 0.08 if grouping == "cuda" else 1e-4
    with torch.no_grad():
        batch = model.collate(ids)
        if backend == "fast":
            assert batch.padded and (batch.types is not None) == ("token_type_ids" in enc)
            if grouping == "per-length":
                assert batch.order is not None
        assert (model(batch) - ref).abs().max().item() <= tol
        for i in (0, len(ids) - 1):  # one example: nothing padded, the unpadded path
            one = model.collate([ids[i]])
            assert backend == "peft" or not one.padded
            assert (model(one)[0] - ref[i]).abs().max().item() <= tol


# -- ONNX --------------------------------------------------------------------------------------------------------

def test_onnx_feed_gives_pairs_their_token_types(tiny_bert_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loracls.onnx_export import onnx_logits, write_onnx

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3).eval()
    with torch.no_grad():  # a head of visible logits, so that a wrong input shows
        weight = model.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 5)
    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    pairs = PAIRS[:10] + PAIRS[-3:]
    enc = _reference_encoding(tiny_bert_dir, pairs, 32, padding=True, return_tensors="pt")
    with torch.no_grad():  # before the export, which leaves the model in train mode
        ref = model(**enc).logits.numpy()
    write_onnx(model, tok, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    assert "token_type_ids" in inputs
    ids, _ = tokenize(load_tokenizer(str(tiny_bert_dir)), pairs, 32)
    got = onnx_logits(session, inputs, ids, tok.pad_token_id, batch_size=4)
    assert abs(got - ref).max() < 1e-4
    untyped = onnx_logits(session, inputs, [list(x) for x in ids], tok.pad_token_id, batch_size=4)
    assert abs(untyped - ref).max() > 1e-2  # all 0 would be another input


# -- reading pairs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def glue_dir(shared_dir):
    folder = shared_dir / "data" / "glue"
    if not (folder / "rte" / "train.tsv").is_file():
        pytest.skip(f"GLUE files not found at {folder}")
    return folder


def _tsv_rows(path) -> list[list[str]]:
    """The file's rows split on tabs, quotes as text (GLUE's TSV)."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_rte_header_gives_the_pair(glue_dir, tmp_path):
    ex, labels = read_examples(str(glue_dir / "rte" / "dev.tsv"))
    rows = _tsv_rows(glue_dir / "rte" / "dev.tsv")
    assert rows[0] == ["index", "sentence1", "sentence2", "label"]
    assert ex.texts == [(r[1], r[2]) for r in rows[1:]] and len(ex) == 139
    assert labels.names == ["entailment", "not_entailment"]
    assert ex.reading["text_pair"] and ex.reading["text_columns"] == ["sentence1", "sentence2"]
    # the other names of PAIR_NAMES, and a pair named on the command line (here against the header's own choice)
    for a, b in (("Question", "Sentence"), ("question1", "question2"), ("premise", "hypothesis"),
                 ("text_a", "text_b"), ("sentence A", "sentence-B")):
        ex, _ = read_examples(_write(glue_dir, tmp_path / "pairs.tsv", a, b), require_labels=False)
        assert ex.texts[0] == (rows[1][1], rows[1][2]) and ex.reading["text_columns"] == [a, b]
    ex, _ = read_examples(str(glue_dir / "rte" / "dev.tsv"), text_pair_columns="sentence2,sentence1")
    assert ex.texts[0] == (rows[1][2], rows[1][1]) and ex.reading["text_why"] == "from --text-pair-columns"
    # columns joined into one text stay as they were
    ex, _ = read_examples(str(glue_dir / "rte" / "dev.tsv"), text_columns=["sentence1", "sentence2"])
    assert ex.texts[0] == f"{rows[1][1]} {rows[1][2]}" and not ex.reading["text_pair"]


def _write(glue_dir, path, a: str, b: str) -> str:
    """RTE's first dev rows under the header id, a, b, label."""
    rows = _tsv_rows(glue_dir / "rte" / "dev.tsv")[:5]
    path.write_text("\n".join("\t".join(r) for r in [["id", a, b, "label"]] + rows[1:]) + "\n", encoding="utf-8")
    return str(path)


def test_headerless_stsb_reads_a_pair_by_index(glue_dir):
    path = glue_dir / "stsb" / "dev.tsv"
    rows = _tsv_rows(path)
    ex, _ = read_examples(str(path), text_pair_columns=["7", "8"], require_labels=False)
    assert ex.texts == [(r[7], r[8]) for r in rows] and len(ex) == 1500
    refusal = _refusal(str(path), text_pair_columns="sentence1,sentence2", require_labels=False)
    assert "no header row" in refusal and "--text-pair-columns 7,8" in refusal


def _refusal(source, **kwargs) -> str:
    with pytest.raises(LoraclsError) as info:
        read_examples(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_pair_column_missing_from_a_split_is_one_line(glue_dir, tiny_bert_dir, tmp_path):
    rows = _tsv_rows(glue_dir / "rte" / "train.tsv")
    train = tmp_path / "train.tsv"
    train.write_text("\n".join("\t".join(r) for r in rows[:81]) + "\n", encoding="utf-8")
    renamed = tmp_path / "validation.tsv"  # sentence2 is called hypothesis here
    renamed.write_text("\n".join("\t".join(r) for r in [["index", "sentence1", "hypothesis", "label"]] + rows[81:121])
                       + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    config = RunConfig(model=str(tiny_bert_dir), data=DataSettings(train=str(train), validation=str(renamed),
                                                                  max_length=32))
    with pytest.raises(LoraclsError) as info:
        load_splits(config, tokenizer, allow_pickle=False)
    message = str(info.value)
    assert "\n" not in message and "text pair column 'sentence2'" in message and "validation.tsv" in message

    # without that file: the pair detected in train is stored as a run's other columns are, and summarized
    config = RunConfig(model=str(tiny_bert_dir), data=DataSettings(train=str(train), max_length=32))
    splits, labels = load_splits(config, tokenizer, allow_pickle=False)
    assert splits["train"].examples.texts[0] == (rows[1][1], rows[1][2])
    assert isinstance(splits["train"].token_ids[0], PairIds)
    stored = config.with_overrides(resolved_columns(splits))
    assert stored.data.text_pair_columns == ["sentence1", "sentence2"] and stored.data.text_columns is None
    assert read_options(stored.data)["text_pair_columns"] == ["sentence1", "sentence2"]
    lines = summary_lines(summary(splits, labels, config.data))
    assert "data: text pair 'sentence1' and 'sentence2', encoded as the tokenizer's pair (found by their names); " \
           "label 'label'" in lines[1]
    assert "a cut shortens the longer text of a pair first" in lines[-1]
    joined = {**summary(splits, labels, config.data), "text_pair": False}
    assert "joined with a space" in summary_lines(joined)[1]


def test_pair_columns_setting():
    assert DataSettings(text_pair_columns="premise, hypothesis").text_pair_columns == ["premise", "hypothesis"]
    assert DataSettings(text_pair_columns=[7, 8]).text_pair_columns == ["7", "8"]
    for bad, words in (("a", "two columns"), ("a,b,c", "two columns")):
        with pytest.raises(LoraclsError, match=words):
            DataSettings(text_pair_columns=bad)
    with pytest.raises(LoraclsError, match="not both"):
        DataSettings(text_columns="a", text_pair_columns="b,c")
    from loracls.cli import build_parser

    args = build_parser().parse_args(["train", "--text-pair-columns", "7,8"])
    assert RunConfig().with_overrides({"data.text_pair_columns": args.text_pair_columns}).data.text_pair_columns \
        == ["7", "8"]
