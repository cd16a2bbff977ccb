"""ImgEdit Basic-Bench: input images from ``image_root / meta.input_image``, flat ``<out>/{original_id}.png`` output,
and the judge-reply aggregation of step1_get_avgscore.py / step2_typescore.py (the GPT-4o judging is not here).

A missing, unreadable, oversized or out-of-root input image raises ``InputImageError`` for that record only;
``check_inputs`` lists them all.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

from benchmarks.common import (
    BenchmarkDefaults,
    PromptRecord,
    Report,
    SampleCheck,
    as_rgb,
    save_png_once,
    iter_unified,
)
from uniar_ray import datasets
from uniar_ray.paths import PathOutsideRoot, inside_root

# scripts/infer/run_imgedit.sh: AR 512^2 x2.0, 1 sample, T 0.1, cfg 2.0, image_key input_image.
DEFAULTS = BenchmarkDefaults(
    prompt_file="uniar/eval_prompts/imgedit.jsonl",
    ar_height=512,
    ar_width=512,
    samples_per_prompt=1,
    temperature=0.1,
    cfg_scale=2.0,
    upsampling_ratio=2.0,
    image_root="uniar/imgedit_images",
)
BASIC_EDIT = "official/imgedit_basic_edit.json"
IMAGE_KEY = "input_image"


class InputImageError(FileNotFoundError):
    """The input image of one edit record is missing, unreadable, too large or outside the image root; the message
    names the record and the path."""


def original_id(record: PromptRecord) -> str:
    """basic_edit.json key: an unpadded decimal string."""
    key = record.meta.get("metadata", {}).get("original_id")
    if not (isinstance(key, str) and key.isdigit() and str(int(key)) == key):
        raise ValueError(f"imgedit record idx={record.idx}: meta.metadata.original_id must be an unpadded "
                         f"decimal string, got {key!r}")
    return key


def image_root(root: str | Path | None = None) -> Path:
    return Path(root) if root else datasets.fetch_folder(DEFAULTS.image_root)


def input_image_path(record: PromptRecord, root: str | Path | None = None) -> Path:
    rel = record.meta.get(IMAGE_KEY)
    if not isinstance(rel, str) or not rel:
        raise InputImageError(f"imgedit record idx={record.idx}: meta has no {IMAGE_KEY!r} path")
    try:  # folder names may hold spaces ('daily object'): keep Path, never split
        return inside_root(image_root(root), rel, f"imgedit record idx={record.idx}: meta.{IMAGE_KEY}")
    except PathOutsideRoot as e:
        raise InputImageError(str(e)) from None


def load_input_image(record: PromptRecord, root: str | Path | None = None,
                     size: tuple[int, int] | None = None) -> Image.Image:
    """The record's input image as RGB, resized to ``size`` = (width, height) (the AR size, as the reference
    generator does) when given."""
    path = input_image_path(record, root)
    try:
        with Image.open(path) as image:
            image = as_rgb(image)
            image.load()
    except FileNotFoundError:
        raise InputImageError(f"imgedit record idx={record.idx} (id {record.meta.get('metadata', {}).get('original_id')})"
                              f": input image missing: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputImageError(f"imgedit record idx={record.idx}: input image unreadable: {path} ({e})") from None
    return resize_to_ar(image, size) if size else image


def resize_to_ar(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Plain resize to the AR (width, height), no crop: what the reference generator feeds the model."""
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.BICUBIC)


def check_inputs(records: Iterable[PromptRecord], root: str | Path | None = None, max_pixels: int = 0,
                 max_bytes: int = 0) -> list[str]:
    """One message per record whose input image is missing, outside the root, or over ``max_bytes`` / ``max_pixels``
    (0 = no limit): cheap checks (file size, image header), before a run queues any work."""
    problems = []
    for record in records:
        try:
            path = input_image_path(record, root)
        except InputImageError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"imgedit record idx={record.idx}: input image missing: {path}")
        elif problem := size_problem(path, max_pixels, max_bytes):
            problems.append(f"imgedit record idx={record.idx}: input image {path}: {problem}")
    return problems


def size_problem(path: Path, max_pixels: int, max_bytes: int) -> str:
    """Why an input image file is over the byte or pixel limit (0 = none), or '' (shared with custom)."""
    size = path.stat().st_size
    if max_bytes and size > max_bytes:
        return f"{size} bytes, over benchmark.max_input_image_bytes={max_bytes}"
    if not max_pixels:
        return ""
    try:  # the header only: a decompression bomb is refused before its pixels are decoded
        with Image.open(path) as image:
            w, h = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        return f"unreadable ({e})"
    if w * h > max_pixels:
        return f"{w}x{h} = {w * h} pixels, over benchmark.max_input_image_pixels={max_pixels}"
    return ""


class ImgEditWriter:
    """One file per record: ``{original_id}.png``."""

    def __init__(self, out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt):
        if samples_per_prompt != 1:
            raise ValueError(f"imgedit takes exactly 1 sample per prompt (flat <key>.png), got {samples_per_prompt}")
        self.out_dir = Path(out_dir)
        self.samples_per_prompt = 1
        self.check = SampleCheck()

    def sample_path(self, record: PromptRecord, k: int = 0) -> Path:
        return self.out_dir / f"{original_id(record)}.png"

    def sample_paths(self, record: PromptRecord) -> list[Path]:
        path = self.sample_path(record)
        return [path] if path.exists() else []

    def pending(self, record: PromptRecord) -> list[int]:
        return [] if self.check.done(self.sample_path(record)) else [0]

    def write_sample(self, record: PromptRecord, k: int, image: Image.Image) -> bool:
        if k != 0:
            raise ValueError(f"imgedit: sample number must be 0, got {k}")
        return save_png_once(self.sample_path(record), image)

    def finalize(self, record: PromptRecord) -> bool:
        return False


def writer(out_dir: str | Path, samples_per_prompt: int = DEFAULTS.samples_per_prompt, **_: Any) -> ImgEditWriter:
    return ImgEditWriter(out_dir, samples_per_prompt)


def convert(src: str | Path, dst: str | Path, basic_edit: str | Path | None = None, **_: Any) -> Report:
    """Unified run -> flat ``{original_id}.png`` from each prompt's first sample."""
    out = ImgEditWriter(dst)
    report = Report()
    records = []
    for record, samples in iter_unified(src):
        records.append(record)
        if not samples:
            report.problems.append(f"idx {record.idx}: no samples")
            continue
        with Image.open(next(iter(samples.values()))) as image:
            done = out.write_sample(record, 0, image)
        report.written += done
        report.skipped += not done
    return report.merge(check_layout(dst, records, basic_edit))


def read_basic_edit(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    return json.loads(Path(path or datasets.fetch(BASIC_EDIT)).read_text(encoding="utf-8"))


def check_layout(folder: str | Path, records: Iterable[PromptRecord],
                 basic_edit: str | Path | None = None) -> Report:
    """Every key has its ``<key>.png`` (the judge step crashes on a missing one); with ``basic_edit`` the keys
    must be exactly that file's keys (737)."""
    keys = {original_id(r) for r in records}
    report = Report(checks=[f"{len(keys)} flat <original_id>.png files"])
    if basic_edit is not None:
        official = set(read_basic_edit(basic_edit))
        report.checks.append(f"keys equal basic_edit.json's {len(official)}")
        if keys != official:
            report.problems.append(f"keys differ from basic_edit.json: {len(official - keys)} missing, "
                                   f"{len(keys - official)} unknown")
    present = {p.stem for p in Path(folder).glob("*.png")}
    report.problems += [f"{k}.png missing" for k in sorted(keys - present, key=int)]
    report.problems += [f"{k}.png is not a key of this run" for k in sorted(present - keys)]
    return report


# ----------------------------------------------------------------------------------------------------------------
# Judge-reply aggregation (the GPT-4o call itself is not made here)
# ----------------------------------------------------------------------------------------------------------------


def parse_reply(reply: str) -> float | None:
    """Mean of the "Name: <digits>" lines of one judge reply, rounded to 2 decimals; None if there are none.
    Exact official rule: split on ": ", exactly two parts, second all digits ("5." and extra ": " don't count)."""
    scores = []
    for line in reply.splitlines():
        parts = line.split(": ")
        if len(parts) == 2 and parts[1].isdigit():
            scores.append(int(parts[1]))
    return round(sum(scores) / len(scores), 2) if scores else None


def type_scores(replies: dict[str, str], basic_edit: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per edit type mean of per-key scores (2 decimals), and the conventional overall = mean of the types."""
    basic_edit = basic_edit if basic_edit is not None else read_basic_edit()
    per_type: dict[str, list[float]] = defaultdict(list)
    unparsed = []
    for key, reply in replies.items():
        score = parse_reply(reply) if isinstance(reply, str) else None
        if score is None:
            unparsed.append(key)
            continue
        per_type[basic_edit[key]["edit_type"]].append(score)
    types = {t: round(sum(v) / len(v), 2) for t, v in per_type.items()}
    overall = round(sum(types.values()) / len(types), 2) if types else None
    return {"types": types, "overall": overall, "unparsed": unparsed}
