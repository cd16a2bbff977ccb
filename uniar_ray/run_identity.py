"""Run identity: the settings that determine an output folder's files, recorded in its config.json.

``state = claim_folder(out_dir, identity, overwrite=cfg.overwrite)`` before writing anything: the same identity
resumes, another one is refused naming the differing keys; with ``overwrite`` it is "overwrite", and the caller runs
``clear_outputs(out_dir, owned)`` once every other check has passed (a refused start never deletes a run).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from uniar_ray.runlock import LOCK_NAME

RECORD = "config.json"  # holds {"identity": {...}, ...}


class RunIdentityError(ValueError):
    """An output folder holds files made with other settings; the message names the keys and the ways out."""


def normalized(identity: dict[str, Any]) -> dict[str, Any]:
    """As it reads back from JSON (tuples become lists), so a recorded identity compares equal to a fresh one."""
    return json.loads(json.dumps(identity, sort_keys=True))


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a key missing on one side shows as ``(none)``)."""
    old, new = normalized(old), normalized(new)
    keys = sorted(set(old) | set(new))
    return [f"{k}: {_show(old, k)} -> {_show(new, k)}" for k in keys if old.get(k, ...) != new.get(k, ...)]


def _show(d: dict[str, Any], key: str) -> str:
    return json.dumps(d[key]) if key in d else "(none)"


def recorded_identity(folder: str | Path) -> dict[str, Any] | None:
    """The identity recorded in ``folder/config.json``; None when there is none (or it cannot be read)."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    identity = record.get("identity") if isinstance(record, dict) else None
    return identity if isinstance(identity, dict) else None


def claim_folder(folder: str | Path, identity: dict[str, Any], *, overwrite: bool, what: str = "out_dir",
                 option: str = "overwrite=true") -> str:
    """May a run with ``identity`` write into ``folder``? Returns "fresh", "resume" or "overwrite" (a run with other
    settings is there and ``overwrite`` asks to replace it). A folder that is not a run folder (files, no
    config.json) is refused either way: it is never cleared."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunIdentityError(f"{what}={folder} is a file, not a folder: choose another {what}")
    if not folder.is_dir() or all(p.name.startswith(LOCK_NAME) for p in folder.iterdir()):  # the job's lock aside
        return "fresh"
    old = recorded_identity(folder)
    if old is not None and normalized(old) == normalized(identity):
        return "resume"
    if old is None and not (folder / RECORD).exists():
        raise RunIdentityError(f"{what}={folder} is not empty and holds no {RECORD}: it is not a run folder of this "
                               f"job; choose a new {what} (nothing was changed)")
    if not overwrite:
        changes = identity_diff(old, identity) if old is not None else [f"{RECORD} has no readable identity"]
        raise RunIdentityError(
            f"{what}={folder} holds a run made with other settings ({'; '.join(changes)}). Resuming would mix its "
            f"files with new ones. Either choose a new {what}, or pass {option} to delete its outputs and start over "
            "(nothing was changed)")
    return "overwrite"


def clear_outputs(folder: str | Path, owned: tuple[str, ...]) -> None:
    """Delete the entries a run writes (``owned``: files or folders) and nothing else."""
    for name in owned:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
