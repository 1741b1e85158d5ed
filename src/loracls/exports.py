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
from loracls.rundir import RunDir, check_creatable

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
    model.config.problem_type = "single_label_classification"
    model.eval()
    tokenizer = loaded.tokenizer
    tokenizer.model_max_length = loaded.config.data.max_length  # pipeline(truncation=True) truncates like loracls
    return model, tokenizer


@contextlib.contextmanager
def export_folder(run_dir: str | Path, output: str | Path, *, overwrite: bool):
    """The steps every export format shares: open the saved run, check that `output` may be replaced, merge the
    model, and yield (run, merged model, tokenizer, temporary folder); the folder becomes `output` when the block
    ends normally."""
    run = RunDir.open(run_dir)
    run.require_model()
    out = Path(output).absolute()
    check_target(out, run, overwrite=overwrite)
    merged, tokenizer = merged_transformers_model(run.path)
    with atomic_folder(out) as tmp:
        yield run, merged, tokenizer, tmp


def export_run(run_dir: str, output: str, *, overwrite: bool = False) -> Path:
    with export_folder(run_dir, output, overwrite=overwrite) as (run, merged, tokenizer, tmp):
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, run, "transformers")
    return Path(output).absolute()
