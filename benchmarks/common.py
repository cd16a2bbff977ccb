"""Shared parts of the benchmark files: prompt reader, unified output layout, atomic writes, reports.

Each benchmark module (geneval, oneig, longtext, imgedit) builds its reader defaults, writer and converter on these;
``jobs/eval.py`` calls ``read_prompts`` once and a writer's ``pending`` / ``write_sample`` / ``finalize`` per sample.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from PIL import Image

from uniar_ray import datasets
# One record for a reported bad line and one line reader, shared with the RL data reader.
from uniar_ray.data import BadLine, decode_line, iter_lines
from uniar_ray.files import atomic_write
from uniar_ray.paths import PathOutsideRoot, inside_root

SAMPLE_NAME = re.compile(r"^(\d{4})\.png$")

# OCR is pluggable: anything that turns one image into its text (RapidOCR, a VLM, fixed strings in tests).
OCR = Callable[[Image.Image], str]


def rapidocr() -> OCR:
    """An OCR callable on RapidOCR (onnxruntime, models ship in the wheel): recognised lines in reading order,
    joined by spaces. Imported lazily; the official scorers use Qwen2.5-VL, so absolute scores differ from theirs."""
    import numpy as np
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def read(image: Image.Image) -> str:
        lines, _ = engine(np.asarray(as_rgb(image)))
        return " ".join(text for _box, text, _score in lines or [])

    return read


# ----------------------------------------------------------------------------------------------------------------
# Per-benchmark generation defaults (the reference's scripts/infer/run_*.sh)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchmarkDefaults:
    """Generation settings the reference uses for one benchmark; the eval job starts from these."""

    prompt_file: str  # a registered data name (uniar_ray/datasets.py)
    ar_height: int
    ar_width: int
    samples_per_prompt: int
    temperature: float
    cfg_scale: float
    upsampling_ratio: float
    decoder_steps: int = 28
    decoder_guidance: float = 1.5
    image_root: str | None = None  # edit benchmarks: a registered data folder
    seed: int = 0

    def prompt_path(self) -> Path:
        return datasets.fetch(self.prompt_file)


# ----------------------------------------------------------------------------------------------------------------
# Prompt records
# ----------------------------------------------------------------------------------------------------------------


class PromptFileError(ValueError):
    """A prompt line cannot be used; the message names the file and the 1-based line number."""


@dataclasses.dataclass
class PromptRecord:
    """One prompt line: ``idx`` (unique int), ``prompt`` (text used for generation), ``meta`` (passed through)."""

    idx: int
    prompt: str
    meta: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other top-level keys, kept verbatim

    def to_dict(self) -> dict[str, Any]:
        return {"idx": self.idx, "prompt": self.prompt, "meta": self.meta, **self.extra}


def read_prompts(
    path: str | Path, *, skip_bad: bool = False, limit: int | None = None, bad_lines: list[BadLine] | None = None
) -> list[PromptRecord]:
    """Read a ``{"idx", "prompt", "meta"}`` JSONL file. Blank lines are skipped; a missing ``idx`` is the record's
    ordinal among non-blank lines (as the reference generator does). A bad line raises ``PromptFileError``, or with
    ``skip_bad`` is appended to ``bad_lines`` and skipped. ``limit`` keeps the first N good records."""
    return list(iter_prompts(path, skip_bad=skip_bad, limit=limit, bad_lines=bad_lines))


def iter_prompts(
    path: str | Path, *, skip_bad: bool = False, limit: int | None = None, bad_lines: list[BadLine] | None = None
) -> Iterator[PromptRecord]:
    path = Path(path)
    seen: dict[int, int] = {}  # idx -> line, because a duplicate idx would overwrite another prompt's folder
    ordinal, kept = -1, 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read the prompt file ({e.strerror}); set benchmark.prompt_file") \
            from None
    with f:
        for lineno, raw in iter_lines(f):
            # A skipped bad line still takes its ordinal, so fixing it later does not shift the others' folders.
            ordinal += 1
            try:
                record = _parse_line(decode_line(raw), default_idx=ordinal)
                if record.idx in seen:
                    raise ValueError(f"duplicate idx {record.idx} (first on line {seen[record.idx]})")
            except ValueError as e:
                bad = BadLine(str(path), lineno, str(e))
                if not skip_bad:
                    raise PromptFileError(f"{bad} (benchmark.skip_bad_lines=true reports such lines and goes on)") \
                        from None
                if bad_lines is not None:
                    bad_lines.append(bad)
                continue
            seen[record.idx] = lineno
            kept += 1
            yield record
            if limit is not None and kept >= limit:
                return
    if not kept:  # a run over no prompts would report itself complete
        what = f"all {ordinal + 1} non-blank lines are bad" if ordinal >= 0 else "the file is empty"
        raise PromptFileError(f"{path}: no prompts ({what}); a benchmark needs at least one prompt line")


def _parse_line(line: str, default_idx: int) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    idx = obj.pop("idx", default_idx)
    if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
        raise ValueError(f"'idx' must be a non-negative integer, got {idx!r}")
    prompt = obj.pop("prompt", None)
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {prompt!r}")
    if not prompt.strip():  # "" is the unconditional CFG branch's prompt, never a record's
        raise ValueError(f"'prompt' is blank ({prompt!r})")
    meta = obj.pop("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object, got {type(meta).__name__}")
    return PromptRecord(idx=idx, prompt=prompt, meta=meta, extra=obj)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes (uniar_ray/files.py): a temporary hidden name in the same folder, fsync, then os.replace
# ----------------------------------------------------------------------------------------------------------------
# The temporary names start with "." and end with ".tmp", so none of the official scorers' globs (GenEval's digit
# prefix, LongText's *.png, OneIG's <id>*) can pick up a file that a killed run left half-written.


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_save_image(image: Image.Image, path: str | Path, format: str, **params: Any) -> None:
    """Save a PIL image atomically; ``format`` is explicit because the temporary name has no image suffix."""
    atomic_write(path, lambda f: image.save(f, format=format, **params))


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temporary files left by a killed writer (recursively); returns how many were removed."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Finished samples: verified, not assumed
# ----------------------------------------------------------------------------------------------------------------


def image_problem(path: str | Path, size: tuple[int, int] | None = None) -> str:
    """Why ``path`` is not a whole image (of ``size`` = (width, height) when given), or '' when it is: every pixel
    is decoded, so a file cut short or emptied (a full disk, a copy that stopped) is found."""
    try:
        with Image.open(path) as image:
            image.load()
            if size is not None and image.size != tuple(size):
                return f"{image.width}x{image.height} pixels, expected {size[0]}x{size[1]}"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"not a readable image ({e})"
    return ""


def looks_whole(path: str | Path) -> bool:
    """A cheap check without decoding: a PNG ends with its IEND chunk, a WebP is as long as its RIFF header says,
    any other file is not empty (a read-back of a finished run; jobs.eval's resume decodes every sample)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(max(0, size - 12))
            tail = f.read(12)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return tail == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 == size
    return size > 0


class SampleCheck:
    """What a writer counts as a finished sample on resume: a file that decodes whole, at ``size`` (width, height)
    when the run knows it. A damaged one is deleted (and listed in ``removed``) so that it is made again."""

    def __init__(self, size: tuple[int, int] | None = None):
        self.size = size
        self.removed: list[str] = []

    def done(self, path: Path, cells: tuple[int, int] = (1, 1)) -> bool:
        """``cells``: a grid of (columns, rows) samples (OneIG) is that many times the sample size."""
        if not path.exists():
            return False
        why = image_problem(path, None if self.size is None else (self.size[0] * cells[0], self.size[1] * cells[1]))
        if not why:
            return True
        path.unlink()
        self.removed.append(f"{path}: {why}")
        return False


def save_png_once(path: Path, image: Image.Image) -> bool:
    """Write ``image`` as an RGB PNG at ``path`` atomically, unless it exists (resume): True when written."""
    if path.exists():
        return False
    atomic_save_image(as_rgb(image), path, "PNG")
    return True


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


class Writer(Protocol):
    """What the eval pipeline calls. ``pending`` lists the sample numbers still to generate (resume): missing, or
    failing ``check`` (a damaged file is removed there); ``write_sample`` never overwrites (returns False when the
    output already exists); ``finalize`` packs a prompt's outputs when the layout needs all samples at once (OneIG)
    and is a no-op otherwise."""

    samples_per_prompt: int
    check: SampleCheck  # the eval job sets the expected sample size

    def pending(self, record: PromptRecord) -> list[int]: ...

    def sample_paths(self, record: PromptRecord) -> list[Path]: ...  # the PNGs written so far (quick looks)

    def write_sample(self, record: PromptRecord, k: int, image: Image.Image) -> bool: ...

    def finalize(self, record: PromptRecord) -> bool: ...


class UnifiedWriter:
    """The UniAR generator layout: ``<out>/<idx:05d>/metadata.json`` + ``samples/NNNN.png``."""

    def __init__(self, out_dir: str | Path, samples_per_prompt: int):
        self.out_dir = Path(out_dir)
        self.samples_per_prompt = samples_per_prompt
        self.check = SampleCheck()

    def prompt_dir(self, record: PromptRecord) -> Path:
        return self.out_dir / f"{record.idx:05d}"

    def sample_path(self, record: PromptRecord, k: int) -> Path:
        return self.prompt_dir(record) / "samples" / f"{k:04d}.png"

    def sample_paths(self, record: PromptRecord) -> list[Path]:
        return [p for k in range(self.samples_per_prompt) if (p := self.sample_path(record, k)).exists()]

    def pending(self, record: PromptRecord) -> list[int]:
        return [k for k in range(self.samples_per_prompt) if not self.check.done(self.sample_path(record, k))]

    def write_metadata(self, record: PromptRecord) -> None:
        path = self.prompt_dir(record) / "metadata.json"
        text = json.dumps(record.to_dict(), indent=2, ensure_ascii=False)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)

    def write_sample(self, record: PromptRecord, k: int, image: Image.Image) -> bool:
        _check_sample_number(k, self.samples_per_prompt)
        path = self.sample_path(record, k)
        if path.exists():
            return False
        self.write_metadata(record)
        save_png_once(path, image)
        return True

    def finalize(self, record: PromptRecord) -> bool:
        return False


def _check_sample_number(k: int, samples_per_prompt: int) -> None:
    if not 0 <= k < samples_per_prompt:
        raise ValueError(f"sample number {k} outside 0..{samples_per_prompt - 1}")


def copy_samples(src: str | Path, out: Any, samples_per_prompt: int, report: "Report") -> list[PromptRecord]:
    """Every sample of the unified run ``src`` through ``out.write_sample`` (which never overwrites), counted in
    ``report``; samples numbered past ``samples_per_prompt`` are reported and left out. Returns the records seen."""
    records = []
    for record, samples in iter_unified(src):
        records.append(record)
        for k, path in samples.items():
            if k >= samples_per_prompt:
                report.problems.append(f"idx {record.idx}: extra sample {path.name} ignored")
                continue
            with Image.open(path) as image:
                done = out.write_sample(record, k, image)
            report.written += done
            report.skipped += not done
    return records


def iter_unified(src: str | Path) -> Iterator[tuple[PromptRecord, dict[int, Path]]]:
    """Walk a unified-layout run: (record from metadata.json, {sample number: png path}) per digit folder."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"unified run folder not found: {src}")
    for child in sorted(src.iterdir()):
        if not (child.is_dir() and child.name.isdigit()):
            continue
        meta_path = child / "metadata.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{child}: no metadata.json (not a unified-layout prompt folder)")
        try:
            record = _parse_line(meta_path.read_text(encoding="utf-8"), default_idx=int(child.name))
        except ValueError as e:
            raise PromptFileError(f"{meta_path}: {e}") from None
        if record.idx != int(child.name):
            raise PromptFileError(f"{meta_path}: idx {record.idx} does not match its folder name {child.name}")
        samples_dir = child / "samples"
        samples = {}
        if samples_dir.is_dir():
            for p in samples_dir.iterdir():
                if m := SAMPLE_NAME.match(p.name):
                    try:  # a symlinked sample must not pull a file from elsewhere into an official layout
                        samples[int(m.group(1))] = inside_root(src, str(p.relative_to(src)), f"{src}: sample")
                    except PathOutsideRoot as e:
                        raise PromptFileError(str(e)) from None
        yield record, dict(sorted(samples.items()))


# ----------------------------------------------------------------------------------------------------------------
# Conversion reports
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """Outcome of a conversion or a layout check: counts plus human-readable problems (empty = all good)."""

    written: int = 0
    skipped: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    checks: list[str] = dataclasses.field(default_factory=list)  # what was verified, for the log

    @property
    def ok(self) -> bool:
        return not self.problems

    def merge(self, other: "Report") -> "Report":
        self.written += other.written
        self.skipped += other.skipped
        self.problems += other.problems
        self.checks += other.checks
        return self

    def __str__(self) -> str:
        lines = [f"written {self.written}, skipped (already there) {self.skipped}, problems {len(self.problems)}"]
        lines += [f"  check: {c}" for c in self.checks]
        lines += [f"  problem: {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more problems")
        return "\n".join(lines)
