"""Paths named inside data files (ImgEdit's meta.input_image, a mix's json_path, ...) resolved inside a declared root.

``path = inside_root(root, rel, what="imgedit record idx=3: meta.input_image")`` returns the resolved path or raises
``PathOutsideRoot``, a per-record error: absolute paths, ``..`` escapes and symlinks that leave the root are refused.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


class PathOutsideRoot(ValueError):
    """A path read from a data file points outside the folder it must stay in; the message names both."""


def inside_root(root: str | Path, rel: str, what: str = "path") -> Path:
    """``root / rel``, whose resolved form (symlinks followed) must stay inside ``root`` resolved. The path is
    returned as ``root / rel`` so a root reached through a symlink (../shared/data) keeps its spelling.

    The checks are on the text first (absolute, drive letters, ``..``), so the message says what was wrong with
    the record rather than where a symlink happened to lead; then on the resolved path (symlinks out of the root)."""
    if not isinstance(rel, str) or not rel:
        raise PathOutsideRoot(f"{what}: expected a relative path inside {root}, got {rel!r}")
    if "\x00" in rel:
        raise PathOutsideRoot(f"{what}: {rel!r} contains a NUL byte")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or rel.startswith("~"):
        raise PathOutsideRoot(f"{what}: {rel!r} is absolute; paths in data files are relative to {root}")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise PathOutsideRoot(f"{what}: {rel!r} contains '..'; paths in data files must stay inside {root}")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise PathOutsideRoot(f"{what}: {rel!r} leads to {target} (a symlink out of {base}); paths in data files "
                              "must stay inside their root")
    return Path(root) / rel
