"""Plain helpers of the fault suite (fixtures are in conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def prompt_lines(name: str, n: int = 3) -> list[str]:
    return (SHARED / "uniar" / "eval_prompts" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def record(idx: int, prompt: str, **meta) -> str:
    return json.dumps({"idx": idx, "prompt": prompt, "meta": meta})
