"""The reward contract: a batch of (image, prompt, task, metadata) in, one float per sample out (NaN where the reward
does not apply, or failed), plus per-sample errors and per-reward metrics. Also the per-sample image checks.

Every reward in ``rewards/`` satisfies ``RewardModel``; the router (``rewards/router.py``) and the Ray actors
(``actors/reward_models.py``) only use the types defined here.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import time
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardBatch:
    """B samples, aligned lists. ``tasks[i]`` routes sample i (``geneval``, ``ocr``, ``general`` or None)."""

    images: list[np.ndarray]  # B x [H, W, 3] uint8 RGB
    prompts: list[str]  # B raw prompts (the reference's ``raw_prompt``)
    tasks: list[str | None]  # B
    metadata: list[dict[str, Any]]  # B; GenEval rows carry tag/include/exclude

    def __post_init__(self):
        n = len(self.images)
        if not (len(self.prompts) == len(self.tasks) == len(self.metadata) == n):
            raise ValueError(f"RewardBatch lists differ in length: images {n}, prompts {len(self.prompts)}, "
                             f"tasks {len(self.tasks)}, metadata {len(self.metadata)}")

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: Sequence[int]) -> RewardBatch:
        return RewardBatch([self.images[i] for i in indices], [self.prompts[i] for i in indices],
                           [self.tasks[i] for i in indices], [self.metadata[i] for i in indices])


@dataclasses.dataclass
class RewardScores:
    """What ``RewardModel.score`` returns: one score per sample. NaN with ``errors[i] is None`` = not applicable;
    NaN with an error string = failed (counted, never trained on); a failed sample's score is forced to NaN."""

    scores: np.ndarray  # [B] float64
    errors: list[str | None]  # [B]
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> [B] side values (logging)

    def __post_init__(self):
        self.scores = np.array(self.scores, dtype=np.float64).reshape(-1)  # a copy: arrays from Ray are read-only
        if len(self.errors) != self.scores.shape[0]:
            raise ValueError(f"{self.scores.shape[0]} scores but {len(self.errors)} error slots")
        for i, err in enumerate(self.errors):
            if err is not None:
                self.scores[i] = math.nan

    @classmethod
    def failed(cls, n: int, error: str) -> RewardScores:
        return cls(np.full(n, math.nan), [error] * n)

    @classmethod
    def not_applicable(cls, n: int) -> RewardScores:
        return cls(np.full(n, math.nan), [None] * n)


@runtime_checkable
class RewardModel(Protocol):
    """A reward: ``name``, the ``tasks`` it applies to (None = every sample) and ``score``."""

    name: str
    tasks: frozenset[str] | None

    def score(self, batch: RewardBatch) -> RewardScores:
        """Score every sample of ``batch``; NaN where not applicable; never raise for one bad sample."""
        ...


def applies_to(tasks: frozenset[str] | None, task: str | None) -> bool:
    return tasks is None or task in tasks


@dataclasses.dataclass
class RewardOutput:
    """One reward's scores over a whole (router-level) batch, with the metrics it logs."""

    name: str
    scores: np.ndarray  # [B] float64
    errors: list[str | None]  # [B]
    called: int  # samples sent to the reward (0: the reward was not called at all)
    elapsed_s: float
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(e is not None for e in self.errors)

    def metrics(self) -> dict[str, float]:
        valid = self.scores[~np.isnan(self.scores)]
        prefix = f"reward/{self.name}"
        return {
            f"{prefix}/mean": float(valid.mean()) if valid.size else math.nan,
            f"{prefix}/std": float(valid.std()) if valid.size else math.nan,
            f"{prefix}/count": float(valid.size),
            f"{prefix}/failures": float(self.failures),
            f"{prefix}/not_applicable": float(len(self.errors) - valid.size - self.failures),
            f"{prefix}/time_s": float(self.elapsed_s),
        }

    def log(self) -> None:
        m = self.metrics()
        p = f"reward/{self.name}"
        logger.info("reward %s: mean %.4f std %.4f count %d failures %d not applicable %d time %.3fs", self.name,
                    m[f"{p}/mean"], m[f"{p}/std"], m[f"{p}/count"], m[f"{p}/failures"], m[f"{p}/not_applicable"],
                    m[f"{p}/time_s"])
        failed = [(i, e) for i, e in enumerate(self.errors) if e is not None]
        for i, err in failed[:5]:
            logger.warning("reward %s: sample %d failed: %s", self.name, i, err)
        if len(failed) > 5:
            logger.warning("reward %s: ... and %d more failed samples", self.name, len(failed) - 5)


def scatter(n: int, indices: Sequence[int], part: RewardScores) -> tuple[np.ndarray, list[str | None],
                                                                         dict[str, np.ndarray]]:
    """Place a sub-batch's results at ``indices`` of a length-``n`` batch (NaN / None elsewhere)."""
    if len(part.errors) != len(indices):
        raise ValueError(f"reward returned {len(part.errors)} results for {len(indices)} samples")
    scores = np.full(n, math.nan)
    errors: list[str | None] = [None] * n
    idx = np.asarray(indices, dtype=np.int64)
    scores[idx] = part.scores
    for i, err in zip(indices, part.errors):
        errors[i] = err
    extras = {}
    for key, values in part.extras.items():
        full = np.full(n, math.nan)
        full[idx] = np.asarray(values, dtype=np.float64)
        extras[key] = full
    return scores, errors, extras


def run_reward(model: RewardModel, batch: RewardBatch) -> RewardOutput:
    """Route, call and scatter one reward in this process. A batch with no applicable sample does not call it;
    an exception fails the routed samples (NaN + reason) instead of propagating."""
    indices = [i for i, t in enumerate(batch.tasks) if applies_to(model.tasks, t)]
    start = time.perf_counter()
    if not indices:
        part = RewardScores.not_applicable(0)
    else:
        try:
            part = model.score(batch.select(indices))
            if len(part.errors) != len(indices):
                raise ValueError(f"returned {len(part.errors)} results for {len(indices)} samples")
        except Exception as e:  # noqa: BLE001 - one reward's crash must not take the others down
            logger.exception("reward %s failed on %d samples", model.name, len(indices))
            part = RewardScores.failed(len(indices), f"{type(e).__name__}: {e}")
    scores, errors, extras = scatter(len(batch), indices, part)
    out = RewardOutput(model.name, scores, errors, len(indices), time.perf_counter() - start, extras)
    out.log()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Images: what crosses a process boundary is a uint8 array or encoded bytes, checked per sample on arrival.
# ----------------------------------------------------------------------------------------------------------------


class ImageRejected(ValueError):
    """An image that is not scored: corrupt, oversized, a decompression bomb or the wrong shape/dtype."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 4096 * 4096
    max_bytes: int = 64 * 2**20
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


def check_image(data: np.ndarray | bytes | bytearray | memoryview, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """-> [H, W, 3] uint8 RGB, or raise ``ImageRejected``. Encoded bytes are checked against the pixel limit from
    their header, before any pixel is decoded (this is what stops a decompression bomb)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _decode(bytes(data), limits)
    if not isinstance(data, np.ndarray):
        raise ImageRejected(f"expected a uint8 array or encoded bytes, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise ImageRejected(f"image dtype {data.dtype}, expected uint8")
    if data.ndim == 2:
        data = np.repeat(data[:, :, None], 3, axis=2)
    if data.ndim != 3 or data.shape[2] != 3 or data.shape[0] < 1 or data.shape[1] < 1:
        raise ImageRejected(f"image shape {data.shape}, expected [H, W, 3]")
    if data.shape[0] * data.shape[1] > limits.max_pixels:
        raise ImageRejected(f"image {data.shape[1]}x{data.shape[0]} exceeds {limits.max_pixels} pixels")
    return data


def _decode(data: bytes, limits: ImageLimits) -> np.ndarray:
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise ImageRejected(f"encoded image of {len(data)} bytes exceeds {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format not in limits.formats:
                raise ImageRejected(f"image format {img.format}, expected one of {', '.join(limits.formats)}")
            w, h = img.size
            if w * h > limits.max_pixels or w < 1 or h < 1:
                raise ImageRejected(f"image {w}x{h} exceeds {limits.max_pixels} pixels (decompression bomb?)")
            img.load()
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ImageRejected:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the bytes", str(e))
        raise ImageRejected(f"corrupt image: {type(e).__name__}: {msg}") from None
    return arr


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def score_checked(model: RewardModel, raw_images: Sequence[Any], prompts: Sequence[str], tasks: Sequence[str | None],
                  metadata: Sequence[dict[str, Any]], limits: ImageLimits = ImageLimits()) -> RewardScores:
    """Check each image, score the accepted ones, and report the rejected ones as per-sample failures."""
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for raw in raw_images:
        try:
            images.append(check_image(raw, limits))
            errors.append(None)
        except ImageRejected as e:
            images.append(None)
            errors.append(f"image rejected: {e}")
    ok = [i for i, e in enumerate(errors) if e is None]
    n = len(raw_images)
    if not ok:
        return RewardScores(np.full(n, math.nan), errors)
    batch = RewardBatch([images[i] for i in ok], [prompts[i] for i in ok], [tasks[i] for i in ok],
                        [metadata[i] for i in ok])
    part = model.score(batch)
    scores, part_errors, extras = scatter(n, ok, part)
    merged = [errors[i] if errors[i] is not None else part_errors[i] for i in range(n)]
    return RewardScores(scores, merged, extras)
