"""OneIG-Bench text rendering: 2x2 lossless-WebP grids at ``<out>/<category folder>/<model>/<id>.webp``, and the
official text score (ED, CR, WAC) with a pluggable OCR callable.

Writer: samples are staged in the unified layout under ``<out>/unified/`` and packed when a prompt has all four.
Score: ``score_folder(<out>/text/<model>, ocr)`` reads the grids exactly as scripts/text/text_score.py does.
"""
from __future__ import annotations

import csv
import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from benchmarks.common import (
    OCR,
    BenchmarkDefaults,
    PromptRecord,
    Report,
    SampleCheck,
    UnifiedWriter,
    as_rgb,
    atomic_save_image,
    iter_unified,
)
from uniar_ray import datasets

# scripts/infer/run_oneig.sh: AR 704 tall x 1280 wide, x1.0, 4 samples, T 0.1, cfg 2.0.
DEFAULTS = BenchmarkDefaults(
    prompt_file="uniar/eval_prompts/oneig.jsonl",
    ar_height=704,
    ar_width=1280,
    samples_per_prompt=4,
    temperature=0.1,
    cfg_scale=2.0,
    upsampling_ratio=1.0,
)
TEXT_CONTENT = "official/oneig_text_content.csv"
GRID = (2, 2)  # (columns, rows); both scorers agree only for square grids
CATEGORY_FOLDERS = {
    "Anime_Stylization": "anime",
    "Portrait": "human",
    "General_Object": "object",
    "Text_Rendering": "text",
    "Knowledge_Reasoning": "reasoning",
    "Multilingualism": "multilingualism",
}
MAX_EDIT_DISTANCE = {"EN": 100, "ZH": 50}
CLEANUP = ("addCriterion", "No text recognized.")


# ----------------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------------


def pack_grid(images: Sequence[Image.Image], grid: tuple[int, int] = GRID, pad: bool = False) -> Image.Image:
    """Row-major grid: sample 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. Cells are the samples'
    (width, height); missing cells are exactly black only when ``pad`` is asked for."""
    cols, rows = grid
    if not images:
        raise ValueError("pack_grid: no images")
    if len(images) > cols * rows:
        raise ValueError(f"pack_grid: {len(images)} images do not fit a {cols}x{rows} grid")
    if len(images) < cols * rows and not pad:
        raise ValueError(f"pack_grid: {len(images)} of {cols * rows} samples (pass pad=True for black tiles)")
    w, h = images[0].size
    for i, image in enumerate(images):
        if image.size != (w, h):
            raise ValueError(f"pack_grid: sample {i} is {image.size}, sample 0 is {(w, h)}; sizes must match")
    canvas = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(as_rgb(image), (c * w, r * h))
    return canvas


def split_grid(image: Image.Image, grid: tuple[int, int] = GRID) -> list[Image.Image]:
    """Cells row by row, left to right, skipping cells whose every pixel is exactly (0, 0, 0) (padding)."""
    cols, rows = grid
    image = as_rgb(image)
    w, h = image.width // cols, image.height // rows
    cells = []
    for r in range(rows):
        for c in range(cols):
            cell = image.crop((c * w, r * h, (c + 1) * w, (r + 1) * h))
            if np.asarray(cell).any():
                cells.append(cell)
    return cells


def save_grid(grid_image: Image.Image, path: str | Path) -> None:
    # Lossless: lossy WebP lifts black padding tiles off (0,0,0), so the splitter would OCR them as samples.
    atomic_save_image(grid_image, path, "WEBP", lossless=True)


def prompt_id(record: PromptRecord) -> str:
    """The CSV id verbatim: a 3-digit string (never an int, never re-padded)."""
    pid = record.meta.get("id")
    if not (isinstance(pid, str) and re.fullmatch(r"\d{3}", pid)):
        raise ValueError(f"oneig record idx={record.idx}: meta.id must be a 3-digit string, got {pid!r}")
    return pid


def category_folder(record: PromptRecord) -> str:
    category = record.meta.get("category", "Text_Rendering")
    if category not in CATEGORY_FOLDERS:
        raise ValueError(f"oneig record idx={record.idx}: unknown category {category!r}")
    return CATEGORY_FOLDERS[category]


# ----------------------------------------------------------------------------------------------------------------
# Writer and converter
# ----------------------------------------------------------------------------------------------------------------


class OneIGWriter:
    """Stages samples as unified PNGs and writes the grid when a prompt is complete (or on ``finalize`` with
    ``pad_missing``). Resume: a prompt whose grid exists has nothing pending."""

    def __init__(self, out_dir: str | Path, model_name: str = "uniar",
                 samples_per_prompt: int = DEFAULTS.samples_per_prompt, pad_missing: bool = False,
                 staging: str | Path | None = None):
        if samples_per_prompt > GRID[0] * GRID[1]:
            raise ValueError(f"oneig: {samples_per_prompt} samples do not fit a {GRID[0]}x{GRID[1]} grid")
        if not model_name or "/" in model_name:
            raise ValueError(f"oneig: bad model name {model_name!r}")
        self.out_dir = Path(out_dir)
        self.model_name = model_name
        self.samples_per_prompt = samples_per_prompt
        self.pad_missing = pad_missing
        self.staging = UnifiedWriter(staging or self.out_dir / "unified", samples_per_prompt)

    def grid_path(self, record: PromptRecord) -> Path:
        return self.out_dir / category_folder(record) / self.model_name / f"{prompt_id(record)}.webp"

    @property
    def check(self) -> SampleCheck:  # one check for the staged samples and the grids made of them
        return self.staging.check

    @check.setter
    def check(self, value: SampleCheck) -> None:
        self.staging.check = value

    def sample_paths(self, record: PromptRecord) -> list[Path]:
        return self.staging.sample_paths(record)

    def pending(self, record: PromptRecord) -> list[int]:
        return [] if self.check.done(self.grid_path(record), cells=GRID) else self.staging.pending(record)

    def write_sample(self, record: PromptRecord, k: int, image: Image.Image) -> bool:
        if self.grid_path(record).exists():
            return False
        written = self.staging.write_sample(record, k, image)
        if not self.staging.pending(record):
            self.finalize(record)
        return written

    def finalize(self, record: PromptRecord) -> bool:
        """Write the grid from the staged samples; False if it already exists. Refuses an incomplete prompt
        unless ``pad_missing``."""
        return write_grid(self.grid_path(record), self.staging.sample_paths(record), self.samples_per_prompt,
                          self.pad_missing, record)


def write_grid(path: Path, sample_paths: Sequence[Path], samples_per_prompt: int, pad: bool,
               record: PromptRecord) -> bool:
    if path.exists():
        return False
    if not sample_paths or (len(sample_paths) < samples_per_prompt and not pad):
        raise ValueError(f"oneig idx={record.idx} id={record.meta.get('id')}: {len(sample_paths)} of "
                         f"{samples_per_prompt} samples; refusing to write a partial grid (pad_missing pads black)")
    images = [Image.open(p) for p in sample_paths[:samples_per_prompt]]
    try:
        save_grid(pack_grid(images, pad=pad), path)
    finally:
        for image in images:
            image.close()
    return True


def writer(out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt, model_name: str = "uniar",
           pad_missing: bool = False, **_: Any) -> OneIGWriter:
    return OneIGWriter(out_dir, model_name, samples_per_prompt, pad_missing)


def convert(src: str | Path, dst: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt,
            model_name: str = "uniar", pad_missing: bool = False, **_: Any) -> Report:
    """Unified run -> ``<dst>/<folder>/<model>/<id>.webp`` grids from the sorted samples."""
    report = Report()
    out = OneIGWriter(dst, model_name, samples_per_prompt, pad_missing, staging=src)
    records = []
    for record, samples in iter_unified(src):
        records.append(record)
        try:
            done = write_grid(out.grid_path(record), list(samples.values()), samples_per_prompt, pad_missing,
                              record)
        except (ValueError, OSError) as e:
            report.problems.append(str(e))
            continue
        report.written += done
        report.skipped += not done
    return report.merge(check_layout(dst, records, model_name))


def check_layout(folder: str | Path, records: Iterable[PromptRecord], model_name: str = "uniar") -> Report:
    """Emulate the scorer's lookup: for every id, the glob ``<id>*`` in its model folder finds exactly one file,
    a 2x2 grid of equal cells."""
    records = list(records)
    report = Report(checks=[f"{len(records)} ids: glob '<id>*' matches exactly one grid"])
    for record in records:
        try:
            d = Path(folder) / category_folder(record) / model_name
            pid = prompt_id(record)
        except ValueError as e:
            report.problems.append(str(e))
            continue
        found = sorted(d.glob(f"{pid}*")) if d.is_dir() else []
        if len(found) != 1:
            report.problems.append(f"{d.parent.name}/{d.name}/{pid}*: {len(found)} matches ({[p.name for p in found]}), need 1")
            continue
        with Image.open(found[0]) as image:
            if image.width % GRID[0] or image.height % GRID[1]:
                report.problems.append(f"{found[0].name}: {image.size} does not split into {GRID} cells")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Text score (scripts/text/text_score.py + text_utils.py)
# ----------------------------------------------------------------------------------------------------------------

_NOT_ALLOWED = re.compile(r"[^\u4e00-\u9fa5a-zA-Z0-9\sàâäéèêëîïôöùûüçÀÂÄÉÈÊËÎÏÔÖÙÛÜÇ]")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def normalize(text: str) -> str:
    """Keep ASCII letters/digits, whitespace, CJK and the listed accented letters; collapse spaces. Strings with
    CJK lose all spaces. Case is kept (OneIG does not lower-case)."""
    cleaned = _NOT_ALLOWED.sub("", text)
    if _CJK.search(cleaned):
        return re.sub(r"\s", "", cleaned)
    return re.sub(r"\s+", " ", cleaned).strip()


def clean_ocr(text: str) -> str:
    for junk in CLEANUP:
        text = text.replace(junk, "")
    return text


def levenshtein(a: str, b: str) -> int:
    """Character edit distance; rows vectorised (insertions via a running minimum) so long texts stay fast."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    bb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    j = np.arange(len(b) + 1)
    prev = j.copy()
    for i, ch in enumerate(a, start=1):
        sub = prev[:-1] + (bb != ord(ch))
        row = np.empty_like(prev)
        row[0] = i
        row[1:] = np.minimum(prev[1:] + 1, sub)
        # insertion chain: row[j] = min_k<=j (row[k] + j - k)
        prev = np.minimum.accumulate(row - j) + j
    return int(prev[-1])


@dataclasses.dataclass
class CellScore:
    edit_distance: int
    matched_words: int
    gt_words: int

    @property
    def complete(self) -> bool:
        return self.edit_distance == 0


def score_cell(ocr_text: str, gt_text: str) -> CellScore:
    """One cell against the raw ``text_content`` string (brackets and quotes vanish in normalisation)."""
    ocr, gt = normalize(clean_ocr(ocr_text)), normalize(gt_text)
    units = (lambda s: list(s)) if _CJK.search(gt) else str.split
    matched = sum((Counter(units(gt)) & Counter(units(ocr))).values())
    return CellScore(levenshtein(ocr, gt), matched, len(units(gt)))


def aggregate(cells: Sequence[CellScore], mode: str = "EN") -> dict[str, float]:
    """Micro aggregation over all cells of all found prompts; text score = 1 - min(M, ED)(1 - CR)(1 - WAC)/M."""
    if not cells:
        raise ValueError("oneig text score: no cells scored (no grid found?)")
    m = MAX_EDIT_DISTANCE[mode]
    ed = sum(c.edit_distance for c in cells) / len(cells)
    cr = sum(c.complete for c in cells) / len(cells)
    gt_words = sum(c.gt_words for c in cells)
    wac = sum(c.matched_words for c in cells) / gt_words if gt_words else 0.0
    return {"ED": ed, "CR": cr, "WAC": wac, "text_score": 1 - min(m, ed) * (1 - cr) * (1 - wac) / m,
            "cells": len(cells)}


def read_text_content(path: str | Path | None = None) -> dict[str, str]:
    """id (3-digit string, verbatim) -> raw text_content string."""
    path = Path(path) if path else datasets.fetch(TEXT_CONTENT)
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: row["text_content"] for row in csv.DictReader(f)}


def score_folder(folder: str | Path, ocr: OCR, gt: dict[str, str] | None = None, mode: str = "EN",
                 grid: tuple[int, int] = GRID) -> dict[str, Any]:
    """Score ``text/<model>/``: per id, the glob ``<id>*`` must match exactly one file, else the id is dropped
    (and listed). An all-black grid is also dropped (the official code would reuse stale OCR there)."""
    gt = gt if gt is not None else read_text_content()
    cells: list[CellScore] = []
    per_prompt: dict[str, dict[str, float]] = {}
    dropped: list[str] = []
    for pid, text in gt.items():
        found = list(Path(folder).glob(f"{pid}*"))
        tiles = []
        if len(found) == 1:
            with Image.open(found[0]) as image:
                tiles = split_grid(image, grid)
        if not tiles:
            dropped.append(pid)
            continue
        scored = [score_cell(ocr(tile), text) for tile in tiles]
        cells += scored
        # the official per-prompt CSV: means over the prompt's cells, WAC as the mean of per-cell ratios
        per_prompt[pid] = {"ED": sum(c.edit_distance for c in scored) / len(scored),
                           "CR": sum(c.complete for c in scored) / len(scored),
                           "WAC": sum(c.matched_words / c.gt_words if c.gt_words else 0.0 for c in scored)
                           / len(scored)}
    result = aggregate(cells, mode) if cells else {"text_score": None}
    return {**result, "mode": mode, "found": len(per_prompt), "dropped": dropped, "per_prompt": per_prompt}
