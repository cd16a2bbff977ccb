"""LongText-Bench (X-Omni textbench): flat ``<out>/{prompt_id}_{k}.png`` layout and the word-recall text score.

The file prefix is ``meta.prompt_id`` (0-79, 100-139, 160-199), never the line idx: the scorer dies on an unknown id.
Score: ``score_folder(out, ocr, records)`` = sum(matched words) / sum(GT words) over all images, lower-cased.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from benchmarks.common import (
    OCR,
    BenchmarkDefaults,
    PromptRecord,
    Report,
    SampleCheck,
    as_rgb,
    save_png_once,
    _check_sample_number,
    copy_samples,
)

# scripts/infer/run_longtext.sh: AR 704 tall x 1280 wide, x1.0, 4 samples, T 0.1, cfg 2.0.
DEFAULTS = BenchmarkDefaults(
    prompt_file="uniar/eval_prompts/longtext.jsonl",
    ar_height=704,
    ar_width=1280,
    samples_per_prompt=4,
    temperature=0.1,
    cfg_scale=2.0,
    upsampling_ratio=1.0,
)
# The official clean-up meant to drop "addCriterion" too, but a loop bug keeps only this one.
CLEANUP = ("No text recognized.",)


def prompt_id(record: PromptRecord) -> int:
    pid = record.meta.get("prompt_id")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise ValueError(f"longtext record idx={record.idx}: meta.prompt_id must be a non-negative int, got {pid!r}")
    return pid


class LongTextWriter:
    """Writes each sample straight to ``{prompt_id}_{k}.png`` (0-based k, as UniAR; the scorer ignores k)."""

    def __init__(self, out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt):
        self.out_dir = Path(out_dir)
        self.samples_per_prompt = samples_per_prompt
        self.check = SampleCheck()

    def sample_path(self, record: PromptRecord, k: int) -> Path:
        return self.out_dir / f"{prompt_id(record)}_{k}.png"

    def sample_paths(self, record: PromptRecord) -> list[Path]:
        return [p for k in range(self.samples_per_prompt) if (p := self.sample_path(record, k)).exists()]

    def pending(self, record: PromptRecord) -> list[int]:
        return [k for k in range(self.samples_per_prompt) if not self.check.done(self.sample_path(record, k))]

    def write_sample(self, record: PromptRecord, k: int, image: Image.Image) -> bool:
        _check_sample_number(k, self.samples_per_prompt)
        return save_png_once(self.sample_path(record, k), image)

    def finalize(self, record: PromptRecord) -> bool:
        return False


def writer(out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt, **_: Any) -> LongTextWriter:
    return LongTextWriter(out_dir, samples_per_prompt)


def convert(src: str | Path, dst: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt,
            **_: Any) -> Report:
    """Unified run -> flat ``{prompt_id}_{k}.png`` (k = the sample's own number)."""
    report = Report()
    records = copy_samples(src, LongTextWriter(dst, samples_per_prompt), samples_per_prompt, report)
    return report.merge(check_layout(dst, records, samples_per_prompt))


def check_layout(folder: str | Path, records: Iterable[PromptRecord],
                 samples_per_prompt: int = DEFAULTS.samples_per_prompt) -> Report:
    """Every prompt id has exactly ``samples_per_prompt`` PNGs and no PNG names an unknown id (the scorer's
    KeyError/ValueError cases)."""
    records = list(records)
    ids = {prompt_id(r) for r in records}
    report = Report(checks=[f"{len(ids)} ids x {samples_per_prompt} files, no unknown ids"])
    per_id: Counter[int] = Counter()
    for png in Path(folder).glob("*.png"):
        head = png.stem.split("_", 1)[0]
        if not head.isdigit() or int(head) not in ids:
            report.problems.append(f"{png.name}: prefix {head!r} is not a known prompt_id")
            continue
        per_id[int(head)] += 1
    for pid in sorted(ids):
        if per_id[pid] != samples_per_prompt:
            report.problems.append(f"prompt_id {pid}: {per_id[pid]} files, expected {samples_per_prompt}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Text score (textbench/summary_scores.py)
# ----------------------------------------------------------------------------------------------------------------

_NOT_ALLOWED = re.compile(r"[^\u4e00-\u9fa5a-zA-Z0-9\sàâäéèêëîïôöùûüçÀÂÄÉÈÊËÎÏÔÖÙÛÜÇ]")


def normalize(text: str, mode: str = "en") -> str:
    """en: allowed characters, collapsed spaces, lower-cased; zh: allowed characters only, no spaces."""
    cleaned = _NOT_ALLOWED.sub("", text)
    if mode == "en":
        return re.sub(r"\s+", " ", cleaned).strip().lower()
    if mode == "zh":
        return re.sub(r"\s", "", cleaned)
    raise ValueError(f"longtext mode must be 'en' or 'zh', got {mode!r}")


def clean_ocr(text: str) -> str:
    for junk in CLEANUP:
        text = text.replace(junk, "")
    return text


def match_counts(ocr_text: str, gt_texts: list[str], mode: str = "en") -> tuple[int, int]:
    """(matched, GT units): multiset intersection of words (zh: characters) between OCR and the joined GT list."""
    ocr, gt = normalize(clean_ocr(ocr_text), mode), normalize(" ".join(gt_texts), mode)
    units = str.split if mode == "en" else list
    return sum((Counter(units(gt)) & Counter(units(ocr))).values()), len(units(gt))


def score_folder(folder: str | Path, ocr: OCR, records: Iterable[PromptRecord], mode: str = "en") -> dict[str, Any]:
    """Text Score = sum(match) / sum(gt) over every top-level PNG; also per category. GT = meta.text."""
    by_id = {prompt_id(r): r for r in records}
    totals = [0, 0]
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    images = 0
    for png in sorted(Path(folder).glob("*.png")):
        head = png.stem.split("_", 1)[0]
        if not head.isdigit() or int(head) not in by_id:
            raise ValueError(f"longtext score: {png.name} does not name a known prompt_id")
        record = by_id[int(head)]
        with Image.open(png) as image:
            matched, gt = match_counts(ocr(as_rgb(image)), list(record.meta.get("text", [])), mode)
        for bucket in (totals, per_cat[record.meta.get("category", "unknown")]):
            bucket[0] += matched
            bucket[1] += gt
        images += 1
    if not totals[1]:
        raise ValueError(f"longtext score: no scorable images in {folder}")
    return {"text_score": totals[0] / totals[1], "images": images, "mode": mode,
            "categories": {c: m / g if g else None for c, (m, g) in sorted(per_cat.items())}}
