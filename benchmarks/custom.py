"""Any prompt file: ``{idx, prompt, meta}`` JSONL -> the reference generator's unified layout
(``<idx:05d>/metadata.json`` + ``samples/NNNN.png``), resumable, with optional edit inputs (its generate_batch.py).

    python -m jobs.eval --config configs/eval/custom.yaml benchmark.prompt_file=my_prompts.jsonl
    ... benchmark.image_root=/data/inputs benchmark.image_key=input_image      # edit mode: <image_root>/<value>
The image path is looked up as the reference does: ``meta[key]``, then ``meta.meta[key]``, then the record's top level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


from benchmarks.common import BenchmarkDefaults, PromptRecord, Report, UnifiedWriter, copy_samples, iter_unified
from benchmarks.imgedit import InputImageError, size_problem
from uniar_ray.paths import PathOutsideRoot, inside_root

# inference/generate_batch.py's argument defaults: AR 512^2 x2.0, 4 samples, T 0.1, cfg 2.0, 28 steps at 1.5.
DEFAULTS = BenchmarkDefaults(
    prompt_file="",  # none: benchmark.prompt_file is required
    ar_height=512,
    ar_width=512,
    samples_per_prompt=4,
    temperature=0.1,
    cfg_scale=2.0,
    upsampling_ratio=2.0,
)


def image_value(record: PromptRecord, image_key: str) -> Any:
    """The record's input-image entry: ``meta[key]``, then ``meta.meta[key]`` (a nested upstream row), then the
    top level; None when none has it."""
    nested = record.meta.get("meta")
    for place in (record.meta, nested if isinstance(nested, dict) else {}, record.extra):
        if place.get(image_key):
            return place[image_key]
    return None


def input_image_path(record: PromptRecord, root: str | Path, image_key: str) -> Path:
    rel = image_value(record, image_key)
    if not isinstance(rel, str):
        raise InputImageError(f"record idx={record.idx}: no {image_key!r} path (looked in meta, meta.meta and the "
                              f"record's top level), got {rel!r}")
    try:  # a data file must not name files outside image_root (absolute, '..', symlinks out)
        return inside_root(root, rel, f"record idx={record.idx}: {image_key}")
    except PathOutsideRoot as e:
        raise InputImageError(str(e)) from None


def check_inputs(records: Iterable[PromptRecord], root: str | Path, max_pixels: int = 0, max_bytes: int = 0, *,
                 image_key: str) -> list[str]:
    """One message per record whose input image is missing, outside the root or over the size limits (checked
    before a run, as ImgEdit's)."""
    problems = []
    for record in records:
        try:
            path = input_image_path(record, root, image_key)
        except InputImageError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"record idx={record.idx}: input image missing: {path}")
        elif problem := size_problem(path, max_pixels, max_bytes):
            problems.append(f"record idx={record.idx}: input image {path}: {problem}")
    return problems


def writer(out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt, **_: Any) -> UnifiedWriter:
    return UnifiedWriter(out_dir, samples_per_prompt)


def convert(src: str | Path, dst: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt,
            **_: Any) -> Report:
    """Unified -> unified (a copy that keeps only samples 0..samples_per_prompt-1 and never overwrites)."""
    report = Report()
    records = copy_samples(src, UnifiedWriter(dst, samples_per_prompt), samples_per_prompt, report)
    return report.merge(check_layout(dst, records, samples_per_prompt))


def check_layout(folder: str | Path, records: Iterable[PromptRecord],
                 samples_per_prompt: int = DEFAULTS.samples_per_prompt) -> Report:
    """Each record has its folder with a metadata.json that reads back as the record, and exactly
    ``samples_per_prompt`` PNGs; no other digit folders."""
    records = list(records)
    report = Report(checks=[f"{len(records)} prompt folders x {samples_per_prompt} PNGs + metadata.json"])
    expected = {r.idx: r for r in records}
    found = set()
    for record, samples in iter_unified(folder) if Path(folder).is_dir() else []:
        found.add(record.idx)
        want = expected.get(record.idx)
        if want is None:
            report.problems.append(f"{record.idx:05d}: a folder for an idx that is not in the prompt file")
            continue
        if record.to_dict() != want.to_dict():
            report.problems.append(f"{record.idx:05d}: metadata.json differs from the prompt record")
        if sorted(samples) != list(range(samples_per_prompt)):
            report.problems.append(f"{record.idx:05d}: samples {sorted(samples)} != 0..{samples_per_prompt - 1}")
    for idx in sorted(set(expected) - found):
        report.problems.append(f"{idx:05d}: missing")
    return report
