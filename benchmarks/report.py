"""Quick-look outputs of an eval run: a PNG contact sheet of a few prompts, and results.json + summary.md.

``contact_sheet([(label, [png, ...]), ...], out)`` after a run; ``write_summary(out_dir, results)`` at its end.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from benchmarks.common import PromptRecord, atomic_save_image, atomic_write_text


def contact_sheet(rows: Sequence[tuple[str, Sequence[str | Path]]], out_path: str | Path, thumb: int = 256,
                  label_height: int = 40) -> Path:
    """One row per prompt: a wrapped label strip above its samples scaled to fit ``thumb`` x ``thumb``."""
    if not rows:
        raise ValueError("contact_sheet: no rows")
    cols = max(1, max(len(paths) for _, paths in rows))
    row_h = label_height + thumb
    sheet = Image.new("RGB", (cols * thumb, len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, paths) in enumerate(rows):
        y = r * row_h
        text = "\n".join(textwrap.wrap(label, width=max(20, cols * thumb // 7))[:3])
        draw.multiline_text((4, y + 2), text, fill=(0, 0, 0))
        for c, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except (OSError, ValueError, SyntaxError) as e:  # a damaged sample is named in its cell, never fatal
                draw.text((c * thumb + 4, y + label_height + 4), f"unreadable:\n{Path(path).name}\n{str(e)[:60]}",
                          fill=(200, 0, 0))
                continue
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (c * thumb + (thumb - image.width) // 2, y + label_height))
    atomic_save_image(sheet, out_path, "PNG")
    return Path(out_path)


def preview(writer: Any, records: Sequence[PromptRecord], out_path: str | Path, prompts: int = 8,
            thumb: int = 256) -> Path | None:
    """Contact sheet of the first ``prompts`` records that have samples, from any benchmark writer."""
    rows = []
    for record in records:
        if paths := writer.sample_paths(record):
            rows.append((f"[{record.idx}] {record.prompt}", paths))
        if len(rows) == prompts:
            break
    return contact_sheet(rows, out_path, thumb) if rows else None


def summary_markdown(results: dict[str, Any], title: str = "Results") -> str:
    """Scalars as a two-column table; nested mappings (per tag, per category) as their own tables."""
    lines = [f"# {title}", ""]
    scalars = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
    if scalars:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()] + [""]
    for key, value in results.items():
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            lines += [f"## {key}", "", "| name | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in value.items()] + [""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(out_dir: str | Path, results: dict[str, Any], title: str = "Results") -> tuple[Path, Path]:
    """``results.json`` (everything, non-ASCII kept) and ``summary.md`` (the readable part)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "summary.md"
    atomic_write_text(json_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, summary_markdown(results, title) + "\n")
    return json_path, md_path
