"""Finding a model: a local folder, or a Hugging Face hub id downloaded once into the hub cache; its config.json and
its tokenizer."""

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


def model_config_of(config):
    """The config.json of a RunConfig's model alone (a hub model's weights are not fetched): enough to count."""
    return read_model_config(resolve_model_dir(config.model, need_weights=False), config.trust_remote_code)


def read_model_config(model: str, trust_remote_code: bool = False):
    """`transformers.AutoConfig.from_pretrained`; a folder holding only config.json is enough."""
    from transformers import AutoConfig

    text = str(model)
    p = Path(text).expanduser()
    looks_local = p.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        if not p.exists():
            raise LoraclsError(f"model folder {text!r} does not exist; pass an existing folder or a hub id")
        if p.is_dir() and not (p / "config.json").is_file():
            raise LoraclsError(f"model folder {text!r} has no config.json; point --model at a saved model folder")
        if p.is_file():
            raise LoraclsError(f"model {text!r} is a file, not a folder; pass the folder holding config.json")
    try:
        return AutoConfig.from_pretrained(str(p) if looks_local else text, trust_remote_code=trust_remote_code)
    except LoraclsError:
        raise
    except Exception as e:  # OSError (not found / offline), ValueError (bad or unknown config), JSON errors
        raise LoraclsError(f"cannot read the model config of {text!r}: {first_line(e, 160)}") from None


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


def settle_padding(model_config, tokenizer, model_dir: str) -> None:
    """Give a model without a padding token (Llama, Mistral and most decoders ship so) its end-of-sequence token as
    one, in both the config and the tokenizer, as is usual for classifying with them: transformers'
    sequence-classification heads of decoders read the last token that is not padding, and refuse batches without
    a pad_token_id.  A config without one takes the tokenizer's where it has one."""
    if getattr(model_config, "pad_token_id", None) is not None:
        if tokenizer.pad_token is None and 0 <= model_config.pad_token_id < len(tokenizer):
            # an exported tokenizer then pads batches with what the model was built to ignore
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(model_config.pad_token_id))
        return
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoraclsError(f"the model in {model_dir!r} has no padding token and its tokenizer no end-of-sequence "
                               "token to pad with; set pad_token_id in its config.json")
        tokenizer.pad_token = tokenizer.eos_token
    model_config.pad_token_id = int(tokenizer.pad_token_id)


def check_max_length(tokenizer, max_length: int, pair: bool = False) -> None:
    """Refuse a max length that leaves no room for a single word beside the special tokens (of a text pair's
    encoding when pair)."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_length <= special:
        what = "text pair" if pair else "input"
        raise LoraclsError(f"max length {max_length} leaves no room for text: the tokenizer adds {special} special "
                           f"tokens to each {what}; pass --max-length {special + 1} or more (typically 64 to 512)")


# -- token ids: what tokenize gives, what the backends and the ONNX feed read ----------------------------------------

class PairIds(list):
    """The token ids of a text pair whose tokenizer gives its second text token type 1.

    The contract, from `tokenize` to the backends' `collate` and the ONNX feed: every tokenized example is a list of
    ints, its input ids with the special tokens, passed on as it is.  A plain list has token types all 0: a single
    text, or a pair under a tokenizer without token types (RoBERTa: <s> a </s></s> b </s>).  A PairIds is the same
    list, plus `second_start`, the index of its first type-1 token: types are 0 before it and 1 from it (BERT:
    [CLS] a [SEP] | b [SEP]).  `token_types` reads them back; a model gets them only where it has more than one
    token type (config.type_vocab_size > 1).  Slicing or copying the ids gives a plain list: take them whole.
    """

    def __init__(self, ids, second_start: int):
        super().__init__(ids)
        self.second_start = second_start


def token_types(ids) -> list[int]:
    """The token type of each of `ids` (see PairIds): 0 before a pair's second text, 1 from it; all 0 otherwise."""
    start = getattr(ids, "second_start", len(ids))
    return [0] * start + [1] * (len(ids) - start)


def _with_types(ids: list[int], types: list[int]) -> list[int]:
    """ids as PairIds when their token types are 0s then 1s, a plain list when all 0."""
    if not any(types):
        return ids
    start = types.index(1)
    if any(t != 1 for t in types[start:]) or len(types) != len(ids):
        raise LoraclsError(f"the tokenizer gives a text pair the token types {sorted(set(types))} (not 0s then 1s), "
                           "which loracls cannot feed; give the pair as one text with --text-columns a,b")
    return PairIds(ids, start)


# Texts are cut to this many characters per allowed token before tokenizing, so one huge line cannot take
# gigabytes (tokenizers build per-character offsets).  A text whose cut still gives too few tokens is cut
# longer and tokenized again, so the result is what tokenizing the whole text would give.
CHARS_PER_TOKEN = 32


def tokenize(tokenizer, texts, max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per example (special tokens included, truncated to max_length; see PairIds) and how many examples
    were truncated.  texts: a list whose items are a text (str) or a text pair (a, b).  A pair is the tokenizer's
    own pair encoding (its separator, special tokens and token types), the longer text cut first
    (truncation="longest_first"), as tokenizer(a, b, truncation="longest_first", max_length=max_length) gives."""
    pairs = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if not pairs:
        return _tokenize_texts(tokenizer, list(texts), max_length)
    for i in pairs:
        t = texts[i]
        if not (isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(s, str) for s in t)):
            raise LoraclsError(f"input {i} is a {type(t).__name__}, neither a text nor a pair of texts (a, b); "
                               "give each input as a string or a tuple of two strings")
    singles = [i for i, t in enumerate(texts) if isinstance(t, str)]
    out: list = [None] * len(texts)
    truncated = 0
    for idx, encode in ((singles, _tokenize_texts), (pairs, _tokenize_pairs)):
        if idx:
            ids, n = encode(tokenizer, [texts[i] for i in idx], max_length)
            for i, x in zip(idx, ids):
                out[i] = x
            truncated += n
    return out, truncated


def _tokenize_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
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


def _tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> tuple[list[list[int]], int]:
    check_max_length(tokenizer, max_length, pair=True)
    firsts, seconds = zip(*(_cut_pair(tokenizer, a, b, max_length) for a, b in pairs))
    # One token longer than allowed tells which pairs are truncated.  Those are encoded again at max_length:
    # longest_first shares the cut between the two texts, which dropping one token afterwards cannot reproduce.
    enc = _encode_pairs(tokenizer, list(firsts), list(seconds), max_length + 1)
    long = [i for i, ids in enumerate(enc) if len(ids) > max_length]
    if long:
        again = _encode_pairs(tokenizer, [firsts[i] for i in long], [seconds[i] for i in long], max_length)
        for i, ids in zip(long, again):
            enc[i] = ids
    return enc, len(long)


def _cut_pair(tokenizer, a: str, b: str, max_length: int) -> tuple[str, str]:
    """(a, b), each cut by characters where that leaves the pair's encoding (at max_length + 1 tokens or fewer) as
    the whole pair's.  longest_first keeps a prefix of each text, of a length that depends only on the two token
    counts up to the budget and on which text is longer (it gets the odd token when both are cut).  So a cut text
    must give more than max_length tokens, and be the longer exactly when its whole text is.  Where one text is
    whole that is known.  Where both are longer than the cut, the longer in characters is taken for the longer
    in tokens: counting both whole would cost what the cut is there to spare (and in transformers, a pair of two
    long texts truncated short takes gigabytes)."""
    texts, cuts = (a, b), [max_length * CHARS_PER_TOKEN] * 2
    if len(a) <= cuts[0] and len(b) <= cuts[1]:
        return a, b
    counts = [_count(tokenizer, t[:c]) for t, c in zip(texts, cuts)]
    while True:
        cut = [len(t) > c for t, c in zip(texts, cuts)]
        if not any(cut):
            return a, b
        grow = [k for k in (0, 1) if cut[k] and counts[k] <= max_length]
        if not grow:
            longer = cut.index(True) if not all(cut) else 0 if len(a) > len(b) else 1
            grow = [longer] if counts[longer] <= counts[1 - longer] else []
        if not grow:
            return a[:cuts[0]], b[:cuts[1]]
        for k in grow:
            cuts[k] *= 4
            counts[k] = _count(tokenizer, texts[k][:cuts[k]])


def _count(tokenizer, text: str) -> int:
    """Tokens of text, special tokens left out.  (Truncated at a length no text reaches: transformers warns of any
    text longer than the model takes when it is not truncating.)"""
    return len(tokenizer(text, add_special_tokens=False, truncation=True, max_length=2**31 - 1)["input_ids"])


def _encode_pairs(tokenizer, firsts: list[str], seconds: list[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(firsts, text_pair=seconds, truncation="longest_first", max_length=max_length)
    types = enc.get("token_type_ids")
    if types is None:  # the tokenizer gives no token types (RoBERTa's)
        return list(enc["input_ids"])
    return [_with_types(ids, t) for ids, t in zip(enc["input_ids"], types)]
