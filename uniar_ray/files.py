"""Files written whole or not at all: a hidden temporary file beside the target, flushed to disk, renamed over it.

    atomic_write(path, lambda f: image.save(f, format="PNG"))      # binary; mode="w" for text (UTF-8)
A reader, a resume after a kill or a crash, or a run on a full disk sees the old file or the new one, never a part.
"""
from __future__ import annotations

import os
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
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is not None and e.filename in (None, str(tmp)):  # a writer's own write (PIL, matplotlib)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e  # names no file: name the one meant
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
