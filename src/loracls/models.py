"""Finding a model: a local folder, or a Hugging Face hub id downloaded once into the hub cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from loracls.errors import LoraclsError, first_line

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(model: str, *, need_weights: bool = True) -> str:
    """A local folder holding the model's config, tokenizer and (if need_weights) weights.

    A hub id ("FacebookAI/roberta-base") is fetched with huggingface_hub into its usual cache, so the second run is
    offline.  Only safetensors and .bin weights are fetched; both load without unpickling code.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.absolute()
        if not (path / "config.json").is_file():
            raise LoraclsError(f"model folder {model!r} has no config.json; pass a Hugging Face model folder")
        if need_weights and not any((path / f).is_file() for f in WEIGHT_FILES):
            raise LoraclsError(f"model folder {model!r} has no weights (model.safetensors or pytorch_model.bin); "
                               "copy them in, or use `loracls plan` which needs only config.json")
        return str(path)
    if path.exists():
        raise LoraclsError(f"model {model!r} is a file, not a folder; pass the folder that holds config.json")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep == "\\" and "\\" in model
    if looks_local or not _HUB_ID.match(model):
        raise LoraclsError(f"model folder {model!r} does not exist; check the --model path")
    return _download(model, need_weights)


def _download(model: str, need_weights: bool) -> str:
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise LoraclsError(f"model {model!r} is not a local folder and huggingface_hub is not installed; "
                           "pass a local model folder") from None
    patterns = ["config.json", "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model"]
    try:
        if need_weights:
            files = set(list_repo_files(model))
            # Prefer safetensors; fetch .bin only when that is all the repo has.
            patterns += ["model.safetensors*"] if any(f.startswith("model.safetensors") for f in files) \
                else ["pytorch_model.bin*"]
        return snapshot_download(model, allow_patterns=patterns)
    except Exception as e:  # network, auth, missing repo: all user-fixable
        raise LoraclsError(f"model {model!r} is neither a local folder nor downloadable from the Hugging Face hub "
                           f"({first_line(e, 100)}); pass a local model folder") from None


# Files that hold a tokenizer's vocabulary.  Without one, transformers still builds a tokenizer, from
# tokenizer_config.json or the model type, with nothing but its few special tokens: every word would be [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model", "bpe.codes")
_MIN_VOCAB = 100


def load_tokenizer(model_dir: str, trust_remote_code: bool = False, vocab_size: int | None = None):
    """The model folder's own tokenizer, checked to be a real one that fits the model's embeddings."""
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise LoraclsError(f"model folder {model_dir!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                           "...); copy the tokenizer of the model it came from into the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise LoraclsError(f"cannot load a tokenizer from {model_dir!r} ({first_line(e)}); "
                           "the model folder needs its tokenizer files") from None
    n = len(tokenizer)
    if n < _MIN_VOCAB:
        raise LoraclsError(f"the tokenizer in {model_dir!r} knows only {n} tokens, so every word would be unknown; "
                           "copy the tokenizer files of the model it came from into the folder")
    if vocab_size is not None and n > vocab_size:
        raise LoraclsError(f"the tokenizer in {model_dir!r} has {n:,} tokens but the model's embeddings hold "
                           f"{vocab_size:,}; the tokenizer belongs to another model, copy in the right one")
    return tokenizer


def check_max_length(tokenizer, max_length: int) -> None:
    """Refuse a max length that leaves no room for a single word beside the special tokens."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise LoraclsError(f"max length {max_length} leaves no room for text: the tokenizer adds {special} special "
                           f"tokens to each input; pass --max-length {special + 1} or more (typically 64 to 512)")


# Texts are cut to this many characters per allowed token before tokenizing, so one huge line cannot take
# gigabytes (tokenizers build per-character offsets).  A text whose cut still gives too few tokens is cut
# longer and tokenized again, so the result is what tokenizing the whole text would give.
CHARS_PER_TOKEN = 32


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text (special tokens included, truncated to max_length) and how many texts were truncated."""
    # Tokenize one token longer than allowed: a text that fills it was truncated.  Cutting the content back by one
    # (keeping the final special token) gives exactly what truncation at max_length gives.
    limit = max_length * CHARS_PER_TOKEN
    enc = tokenizer([t[:limit] for t in texts], truncation=True, max_length=max_length + 1)["input_ids"]
    for i, text in enumerate(texts):
        cut = limit
        while len(text) > cut and len(enc[i]) <= max_length:  # too few tokens from the cut text: cut longer
            cut *= 4
            enc[i] = tokenizer(text[:cut], truncation=True, max_length=max_length + 1)["input_ids"]
    truncated = 0
    for i, ids in enumerate(enc):
        if len(ids) > max_length:
            enc[i] = ids[:max_length - 1] + ids[-1:]
            truncated += 1
    return enc, truncated
