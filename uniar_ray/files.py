"""Files written whole or not at all: a hidden temporary file beside the target, flushed to disk, renamed over it.

    atomic_write(path, lambda f: image.save(f, format="PNG"))      # binary; mode="w" for text (UTF-8)
A reader, a resume after a kill or a crash, or a run on a full disk sees the old file or the new one, never a part.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


def temp_name(path: Path) -> Path:
    """``.<name>.<pid>-<random>.tmp``: hidden, and no benchmark scorer's glob matches it (remove_stale_temps finds
    the ones a killed writer left)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file, fsync it, then rename it to ``path``; on any error (a full disk, a
    stop signal) nothing is left and an existing ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with naming(path, tmp), open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def naming(path: str | Path, *also: str | Path):
    """An OSError raised inside that names no file (a writer's own write into an open file: PIL, matplotlib, a
    JSON dump), or one of ``also`` (a temporary name), is raised again naming ``path``: the person sees which file."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and (e.filename is None or str(e.filename) in map(str, also)):
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


@contextlib.contextmanager
def disk_full_named(folder: str | Path, min_free: int = 16 << 20):
    """A write failure (OSError, RuntimeError, also raised inside a Ray actor) in ``folder`` on a disk left with
    less than ``min_free`` bytes (5% on a small disk) is raised as the ENOSPC it is, naming the folder: torch.save and
    DeepSpeed report a full disk as an obscure RuntimeError ("unexpected pos ...")."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        existing = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
        usage = shutil.disk_usage(existing) if existing is not None else None
        if usage is not None and usage.free < min(min_free, usage.total // 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from e
        raise
