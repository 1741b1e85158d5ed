"""Export a run as a plain transformers model folder: LoRA merged into the weights, head included.

The export goes through transformers + PEFT whatever backend trained the run: the adapter is in PEFT's format, so
PEFT's own `merge_and_unload()` produces the plain architecture, and the folder loads with
`AutoModelForSequenceClassification.from_pretrained` or `pipeline("text-classification")` with neither loracls nor
peft installed.

The folder is built under a temporary name and renamed into place (loracls.atomic.atomic_folder), so a failure,
Ctrl-C or SIGTERM leaves no half-written model.  It holds a manifest, `loracls_export.json`, naming the run it
came from and every file loracls wrote.  `--overwrite` replaces only a folder whose files are all in its
manifest: a folder of anything else, or the run itself, is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from loracls.atomic import atomic_folder, atomic_write_json
from loracls.build import load_run
from loracls.errors import LoraclsError
from loracls.rundir import RunDir, absolute_path, check_creatable
from loracls.tasks import task_of

MANIFEST = "loracls_export.json"


def check_target(out: Path, run: RunDir, *, overwrite: bool) -> None:
    """Refuse an export folder that would lose anything: a file, the run (or a folder around or inside it), or a
    folder holding files loracls did not write."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise LoraclsError(f"export folder {str(out)!r} is a file; choose a new folder with --output")
    check_creatable(out, "export folder", "--output")
    run_path = run.path.resolve()
    target = out.resolve()
    if target == run_path or run_path in target.parents or target in run_path.parents:
        raise LoraclsError(f"export folder {str(out)!r} is the run directory, or inside or around it; "
                           "choose a folder outside the run with --output")
    if not out.is_dir() or not any(out.iterdir()):
        return
    written = set(_manifest_files(out))
    strangers = sorted(p.name for p in out.iterdir() if p.name != MANIFEST and p.name not in written)
    if not written or strangers:
        example = strangers[0] if strangers else next(iter(sorted(p.name for p in out.iterdir())))
        raise LoraclsError(f"export folder {str(out)!r} holds files loracls did not write (e.g. {example!r}); "
                           "choose an empty or new folder with --output (--overwrite only replaces an export)")
    if not overwrite:
        raise LoraclsError(f"export folder {str(out)!r} already holds an export; pass --overwrite to replace it "
                           "or choose a new --output")


def _manifest_files(folder: Path) -> list[str]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        return [f for f in files if isinstance(f, str)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_manifest(folder: Path, run: RunDir, fmt: str, **extra) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    atomic_write_json(folder / MANIFEST, {"format": fmt, "run": str(run.path), "created_at": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "files": files, **extra})


def merged_transformers_model(run_dir: str | Path):
    """The run's base model with its best adapter merged in, as a plain transformers model (fp32, on the CPU),
    with the class names as id2label / label2id, and the tokenizer set to truncate at the run's max_length.
    Built by the one build path (loracls.build) with the peft backend, whose merge is PEFT's merge_and_unload."""
    loaded = load_run(run_dir, backend="peft", device="cpu", merge=True)
    model = loaded.model.model
    model.config.id2label = dict(enumerate(loaded.labels))
    model.config.label2id = {name: i for i, name in enumerate(loaded.labels)}
    model.config.problem_type = task_of(loaded.config).problem_type
    model.eval()
    tokenizer = loaded.tokenizer
    tokenizer.model_max_length = loaded.config.data.max_length  # what save_tokenizer writes
    return model, tokenizer


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer files of an export, set to truncate at the run's max length (tokenizer.model_max_length, which
    merged_transformers_model sets) as training did, special tokens included.

    tokenizer.json carries the truncation (longest_first) and padding to the longest text of a batch, so plain
    `tokenizers.Tokenizer.from_file(...).encode_batch(texts)` gives what ONNX Runtime takes, whatever the texts'
    length; tokenizer_config.json carries model_max_length, where transformers truncates when asked to.
    transformers' own call does not truncate unless asked (it turns tokenizer.json's truncation off per call):
    `pipeline(...)` and `tokenizer(texts)` need `truncation=True`, and then cut at the run's length."""
    max_length = int(tokenizer.model_max_length)
    if getattr(tokenizer, "is_fast", False):
        tokenizer.backend_tokenizer.enable_truncation(max_length=max_length, strategy="longest_first",
                                                     direction=tokenizer.truncation_side)
        if tokenizer.pad_token is not None:
            tokenizer.backend_tokenizer.enable_padding(direction=tokenizer.padding_side,
                                                      pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
                                                      pad_type_id=tokenizer.pad_token_type_id)
    # An original tokenizer_config.json's own truncation settings (MiniLM's max_length 128) would contradict these.
    tokenizer.init_kwargs.update(max_length=max_length, truncation_strategy="longest_first",
                                 truncation_side=tokenizer.truncation_side)
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def export_folder(run_dir: str | Path, output: str | Path, *, overwrite: bool):
    """The steps every export format shares: open the saved run, check that `output` may be replaced, merge the
    model, and yield (run, merged model, tokenizer, temporary folder); the folder becomes `output` when the block
    ends normally."""
    run = RunDir.open(run_dir)
    run.require_model()
    out = absolute_path(output)
    check_target(out, run, overwrite=overwrite)
    merged, tokenizer = merged_transformers_model(run.path)
    with atomic_folder(out) as tmp:
        yield run, merged, tokenizer, tmp


def export_run(run_dir: str, output: str, *, overwrite: bool = False) -> Path:
    with export_folder(run_dir, output, overwrite=overwrite) as (run, merged, tokenizer, tmp):
        merged.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        write_manifest(tmp, run, "transformers")
    return absolute_path(output)
