"""Atomic writes: a reader sees the old file or the new one, never a torn one, whatever instant a kill hits.

Each file is written under a temporary name in its own folder, flushed, fsync'ed and renamed over the old one
(rename is atomic on POSIX).  A folder is built under a temporary name beside its destination and renamed into
place the same way.  Temporary names start with '.', and a failure or an interrupt removes them.

Files and folders get the permissions an ordinary `open()` / `mkdir()` would give under the user's umask
(mkstemp alone would make them private to the user, which other users and services could not read).

This module is a leaf: it imports nothing from loracls.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """The rename itself reaches the disk (on POSIX a directory entry is flushed with its folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete what writers killed mid-write left in `folder` (SIGKILL and power loss run no cleanup): the hidden
    `.NAME.XXXX.tmp` files and folders made above.  Only for a folder whose lock this process holds, so that no
    other writer can be in the middle of one."""
    for p in sorted(Path(folder).rglob(".*.tmp"), key=lambda p: len(p.parts)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)  # gone already if it was inside a folder removed above


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block ends normally, it replaces `out` (which the
    caller has checked may be replaced: absent, empty, or a folder loracls wrote).  When the block raises (an
    error, Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the CLI), the temporary folder is removed and
    `out` is untouched.  Everything inside gets the umask's permissions, whatever wrote it (safetensors, for one,
    writes through a private temporary file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        mask = _umask()
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        # The contents reach the disk before the rename does: else after a power loss `out` may exist with empty
        # files (the writers inside need not have fsync'ed; safetensors does not).
        for p in [*tmp.rglob("*"), tmp]:
            if p.is_dir():
                _fsync_dir(p)
            else:
                _fsync_file(p)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
