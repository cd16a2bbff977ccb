"""GenEval (djghosh13/geneval): output layout the official evaluate_images.py reads, converter, summary.

Layout: ``<out>/<idx:05d>/metadata.jsonl`` (exactly one line: the official prompt-file line) + ``samples/NNNN.png``.
Scoring (detector + CLIP colour) lives in the rewards package; ``summarize`` aggregates its per-image rows.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from benchmarks.common import (
    BenchmarkDefaults,
    PromptRecord,
    Report,
    UnifiedWriter,
    atomic_write_text,
    iter_unified,
)

# scripts/infer/run_geneval.sh: long rewritten prompts, AR 512^2 x2.0, 4 samples, T 0.1, cfg 2.5.
DEFAULTS = BenchmarkDefaults(
    prompt_file="uniar/eval_prompts/geneval_long.jsonl",
    ar_height=512,
    ar_width=512,
    samples_per_prompt=4,
    temperature=0.1,
    cfg_scale=2.5,
    upsampling_ratio=2.0,
)
OFFICIAL_METADATA = "official/geneval_evaluation_metadata.jsonl"
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def official_line(record: PromptRecord) -> str:
    """The official evaluation_metadata.jsonl line for a record (with its newline). For the long-prompt file the
    canonical short prompt replaces the long one and ``short_prompt`` is dropped; keys in the official order."""
    meta = record.meta
    for key in ("tag", "include"):
        if key not in meta:
            raise ValueError(f"geneval record idx={record.idx}: meta has no {key!r}")
    line: dict[str, Any] = {"tag": meta["tag"], "include": meta["include"]}
    if "exclude" in meta:
        line["exclude"] = meta["exclude"]
    line["prompt"] = meta.get("short_prompt", meta.get("prompt", record.prompt))
    return json.dumps(line) + "\n"  # default separators and ASCII escapes, as the official file


class GenEvalWriter(UnifiedWriter):
    """The unified layout plus ``metadata.jsonl`` in every prompt folder; the folder name is the idx, which is
    the official line number, so folder N holds line N's images."""

    def __init__(self, out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt):
        super().__init__(out_dir, samples_per_prompt)

    def write_metadata(self, record: PromptRecord) -> None:
        super().write_metadata(record)
        path = self.prompt_dir(record) / "metadata.jsonl"
        line = official_line(record)
        if not path.exists() or path.read_text(encoding="utf-8") != line:
            atomic_write_text(path, line)


def writer(out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt, **_: Any) -> GenEvalWriter:
    return GenEvalWriter(out_dir, samples_per_prompt)


def convert(src: str | Path, dst: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt,
            **_: Any) -> Report:
    """Unified run -> GenEval layout (copies PNGs and writes each folder's metadata.jsonl)."""
    out = GenEvalWriter(dst, samples_per_prompt)
    report = Report()
    records = []
    for record, samples in iter_unified(src):
        records.append(record)
        out.write_metadata(record)
        for k, path in samples.items():
            if k >= samples_per_prompt:
                report.problems.append(f"idx {record.idx}: extra sample {path.name} ignored")
                continue
            if out.sample_path(record, k).exists():
                report.skipped += 1
                continue
            with Image.open(path) as image:
                out.write_sample(record, k, image)
            report.written += 1
    return report.merge(check_layout(dst, records, samples_per_prompt))


def check_layout(folder: str | Path, records: Iterable[PromptRecord],
                 samples_per_prompt: int = DEFAULTS.samples_per_prompt,
                 official_metadata: str | Path | None = None) -> Report:
    """Check what evaluate_images.py needs: one digit folder per record with a one-object metadata.jsonl and
    ``samples_per_prompt`` PNGs; with ``official_metadata``, folder N's line must equal line N of that file."""
    folder = Path(folder)
    records = list(records)
    official = None
    if official_metadata is not None:
        official = Path(official_metadata).read_text(encoding="utf-8").splitlines(keepends=True)
    report = Report(checks=[f"{len(records)} prompt folders x {samples_per_prompt} PNGs + metadata.jsonl"])
    for record in records:
        d = folder / f"{record.idx:05d}"
        meta_path = d / "metadata.jsonl"
        if not meta_path.exists():
            report.problems.append(f"{d.name}: metadata.jsonl missing")
            continue
        text = meta_path.read_text(encoding="utf-8")
        if len(text.splitlines()) != 1:
            report.problems.append(f"{d.name}: metadata.jsonl must hold exactly one JSON line")
        if official is not None and (record.idx >= len(official) or official[record.idx] != text):
            report.problems.append(f"{d.name}: metadata.jsonl differs from line {record.idx} of the official file")
        pngs = sorted(p.name for p in (d / "samples").glob("*.png")) if (d / "samples").is_dir() else []
        expected = [f"{k:04d}.png" for k in range(samples_per_prompt)]
        if pngs != expected:
            report.problems.append(f"{d.name}: samples {pngs} != {expected}")
    if official is not None:
        report.checks.append("metadata.jsonl equals the official line of its folder number")
    return report


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Official summary_scores.py aggregation over per-image rows with ``tag``, ``correct`` and ``metadata`` (the
    prompt's metadata string): per-tag mean over images, overall = unweighted mean of the per-tag means."""
    rows = list(rows)
    if not rows:
        raise ValueError("geneval summarize: no result rows")
    per_tag: dict[str, list[bool]] = defaultdict(list)  # insertion order = first appearance, as the official
    per_prompt: dict[str, bool] = {}
    for row in rows:
        per_tag[row["tag"]].append(bool(row["correct"]))
        key = row["metadata"] if isinstance(row["metadata"], str) else json.dumps(row["metadata"])
        per_prompt[key] = per_prompt.get(key, False) or bool(row["correct"])
    tag_scores = {tag: sum(v) / len(v) for tag, v in per_tag.items()}
    return {
        "images": len(rows),
        "prompts": len(per_prompt),
        "correct_images": sum(bool(r["correct"]) for r in rows) / len(rows),
        "correct_prompts": sum(per_prompt.values()) / len(per_prompt),
        "tags": tag_scores,
        "overall": sum(tag_scores.values()) / len(tag_scores),
    }
