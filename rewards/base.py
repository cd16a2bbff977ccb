"""The reward contract: a batch of (image, prompt, task, metadata) in, one float per sample out (NaN where the reward
does not apply, or failed), plus per-sample errors, side values, details and per-reward metrics. Also the
per-sample image checks and the image round trip a reward's ``image_format`` asks for.

Every reward in ``rewards/`` satisfies ``RewardModel``, and so must your own class (``class:`` in the config); the
router (``rewards/router.py``) and the Ray actors (``actors/reward_models.py``) only use the types defined here.
A reward whose ``inputs`` is ``"bits"`` reads ``batch.bits`` (each sample's roll-out bits, packed) instead of
``batch.images`` (then all None): nothing is decoded for it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import time
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackedBits:
    """One sample's generated bits as the roll-out carries them: ``packed`` = ``uniar_ray.bits.pack_bits`` of the
    [N, L, U, D] bits (N = AR tokens of an ar_height x ar_width image)."""

    packed: np.ndarray  # [ceil(N*L*U*D / 8)] uint8
    shape: tuple[int, int, int, int]  # (N, L, U, D)
    ar_height: int
    ar_width: int

    @classmethod
    def of(cls, rollout) -> PackedBits:
        """From a ``uniar_ray.rollout.Rollout`` (no copy, no unpacking)."""
        return cls(rollout.bits_packed, tuple(int(x) for x in rollout.bits_shape), rollout.ar_height,
                   rollout.ar_width)

    def unpack(self):
        """[N, L, U, D] uint8 torch tensor; ValueError when the byte count does not fit the shape."""
        from uniar_ray.bits import unpack_bits

        return unpack_bits(self.packed, self.shape)


@dataclasses.dataclass
class RewardBatch:
    """B samples, aligned lists. ``tasks[i]`` routes sample i (``geneval``, ``ocr``, ``general`` or None).
    ``images[i]`` is None for a reward that reads bits; ``bits`` is given to such a reward only."""

    images: list[np.ndarray | None]  # B x [H, W, 3] uint8 RGB
    prompts: list[str]  # B raw prompts (the reference's ``raw_prompt``)
    tasks: list[str | None]  # B
    metadata: list[dict[str, Any]]  # B; GenEval rows carry tag/include/exclude
    bits: list[PackedBits] | None = None  # B, for rewards with inputs = "bits"

    def __post_init__(self):
        n = len(self.images)
        if not (len(self.prompts) == len(self.tasks) == len(self.metadata) == n):
            raise ValueError(f"RewardBatch lists differ in length: images {n}, prompts {len(self.prompts)}, "
                             f"tasks {len(self.tasks)}, metadata {len(self.metadata)}")
        if self.bits is not None and len(self.bits) != n:
            raise ValueError(f"RewardBatch has {n} samples but {len(self.bits)} bits")

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: Sequence[int]) -> RewardBatch:
        return RewardBatch([self.images[i] for i in indices], [self.prompts[i] for i in indices],
                           [self.tasks[i] for i in indices], [self.metadata[i] for i in indices],
                           None if self.bits is None else [self.bits[i] for i in indices])


@dataclasses.dataclass
class RewardScores:
    """What ``RewardModel.score`` returns: one score per sample. NaN with ``errors[i] is None`` = not applicable;
    NaN with an error string = failed (counted, never trained on); a failed sample's score is forced to NaN."""

    scores: np.ndarray  # [B] float64
    errors: list[str | None]  # [B]
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> [B] side values (logging)
    # [B] per-sample JSON objects (a reward server's "details"; made JSON-friendly by ``plain_details``); [] = none
    details: list[dict[str, Any] | None] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.scores = np.array(self.scores, dtype=np.float64).reshape(-1)  # a copy: arrays from Ray are read-only
        n = self.scores.shape[0]
        if len(self.errors) != n:
            raise ValueError(f"{n} scores but {len(self.errors)} error slots")
        self.details = list(self.details) or [None] * n
        if len(self.details) != n:
            raise ValueError(f"{n} scores but {len(self.details)} details")
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
    """A reward: ``name``, the ``tasks`` it applies to (None = every sample) and ``score``.

    Your own class (``class: package.module:ClassName``) is built as ``ClassName(**options)`` in its actor, which
    then sets ``name`` and ``tasks`` from the config. Optional class attribute ``inputs = "bits"`` (must match the
    config's ``inputs``): the reward reads ``batch.bits`` instead of images. ``score`` returns one score per sample
    (NaN = not applicable; an ``errors[i]`` string = failed), optional ``extras`` (name -> [B] floats) and
    ``details`` ([B] JSON objects, kept per sample in ``Rollout.reward_details``)."""

    name: str
    tasks: frozenset[str] | None

    def score(self, batch: RewardBatch) -> RewardScores:
        """Score every sample of ``batch``; NaN where not applicable; never raise for one bad sample."""
        ...


def reads_bits(model: Any) -> bool:
    return getattr(model, "inputs", "pixels") == "bits"


MAX_DETAILS_BYTES = 64 * 1024  # one sample's details as JSON; larger ones are replaced by a note


def plain_details(value: Any) -> dict[str, Any] | None:
    """One sample's details as plain JSON values (numpy scalars and arrays to Python, NaN/inf to None, anything
    else to its str); None stays None; a non-object or one over ``MAX_DETAILS_BYTES`` becomes a short note."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return {"details_dropped": f"expected a JSON object, got {type(value).__name__}"}
    out = _plain_json(value)
    size = len(json.dumps(out))
    return out if size <= MAX_DETAILS_BYTES else {"details_dropped": f"{size} bytes over {MAX_DETAILS_BYTES}"}


def _plain_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


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
    details: list[dict[str, Any] | None] = dataclasses.field(default_factory=list)  # [B] or [] (none)

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
        by_error: dict[str, list[int]] = {}
        for i, err in enumerate(self.errors):
            if err is not None:
                by_error.setdefault(err, []).append(i)
        for err, samples in list(by_error.items())[:5]:  # one line per distinct failure
            shown = ", ".join(map(str, samples[:8])) + (", ..." if len(samples) > 8 else "")
            logger.warning("reward %s: %d sample(s) failed [%s]: %s", self.name, len(samples), shown, err)
        if len(by_error) > 5:
            logger.warning("reward %s: ... and %d more distinct failures", self.name, len(by_error) - 5)


def scatter(n: int, indices: Sequence[int], part: RewardScores, into: RewardScores | None = None) -> RewardScores:
    """Place a sub-batch's results at ``indices`` of a length-``n`` batch (NaN / None elsewhere, or what ``into``
    holds there: the calls of one reward fill one result)."""
    if len(part.errors) != len(indices):
        raise ValueError(f"reward returned {len(part.errors)} results for {len(indices)} samples")
    out = into if into is not None else RewardScores.not_applicable(n)
    idx = np.asarray(indices, dtype=np.int64)
    out.scores[idx] = part.scores
    for j, i in enumerate(indices):
        out.errors[i], out.details[i] = part.errors[j], plain_details(part.details[j])
    for key, values in part.extras.items():
        out.extras.setdefault(key, np.full(n, math.nan))[idx] = np.asarray(values, dtype=np.float64)
    return out


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
    full = scatter(len(batch), indices, part)
    out = RewardOutput(model.name, full.scores, full.errors, len(indices), time.perf_counter() - start, full.extras,
                       full.details)
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


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 75) -> bytes:
    """[H, W, 3] uint8 -> PNG, or JPEG exactly as PIL writes it at ``jpeg_quality`` (its other settings at their
    defaults: the bytes the reference sent with ``image.save(buf, format="JPEG"[, quality=95])``)."""
    if image_format == "png":
        return encode_png(image)
    if image_format != "jpeg":
        raise ValueError(f"image_format={image_format!r}: expected jpeg or png")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def as_sent(image: np.ndarray, image_format: str, jpeg_quality: int = 75) -> np.ndarray:
    """The pixels a reward server decodes from what the reference sent it: for jpeg the image encoded at
    ``jpeg_quality`` and decoded again (PIL), for png the image itself (lossless)."""
    if image_format == "png":
        return image
    return _decode(encode_image(image, image_format, jpeg_quality), ImageLimits(max_pixels=image.shape[0] *
                                                                                image.shape[1]))


@dataclasses.dataclass(frozen=True)
class ImageCodec:
    """How a reward receives its images (its spec's ``image_format`` / ``jpeg_quality``)."""

    image_format: str = "png"
    jpeg_quality: int = 75


def score_checked(model: RewardModel, raw_images: Sequence[Any], prompts: Sequence[str], tasks: Sequence[str | None],
                  metadata: Sequence[dict[str, Any]], limits: ImageLimits = ImageLimits(),
                  codec: ImageCodec = ImageCodec(), bits: Sequence[PackedBits | None] | None = None) -> RewardScores:
    """Check each sample's input, score the accepted ones, and report the rejected ones as per-sample failures.

    A reward reading pixels gets each image checked and, for ``codec.image_format == "jpeg"``, the JPEG round trip
    (unless it encodes images itself: ``encodes_images = True``, as the HTTP reward); one reading bits gets
    ``bits`` (each checked against its shape) and no images."""
    n = len(raw_images)
    images: list[np.ndarray | None] = [None] * n
    errors: list[str | None] = [None] * n
    encode = codec.image_format == "jpeg" and not getattr(model, "encodes_images", False)
    for i in range(n):
        try:
            if reads_bits(model):
                _check_bits(bits[i] if bits is not None else None)
            elif raw_images[i] is None:
                errors[i] = "no image: this sample was not decoded"
            else:
                images[i] = check_image(raw_images[i], limits)
                if encode:
                    images[i] = as_sent(images[i], codec.image_format, codec.jpeg_quality)
        except ImageRejected as e:
            errors[i] = f"image rejected: {e}"
        except BitsRejected as e:
            errors[i] = f"bits rejected: {e}"
    ok = [i for i, e in enumerate(errors) if e is None]
    if not ok:
        return RewardScores(np.full(n, math.nan), errors)
    batch = RewardBatch([images[i] for i in ok], [prompts[i] for i in ok], [tasks[i] for i in ok],
                        [metadata[i] for i in ok], [bits[i] for i in ok] if reads_bits(model) else None)
    full = scatter(n, ok, model.score(batch))
    full.errors = [errors[i] if errors[i] is not None else full.errors[i] for i in range(n)]
    return RewardScores(full.scores, full.errors, full.extras, full.details)


class BitsRejected(ValueError):
    """A sample's bits that are not scored: missing, or a byte count that does not fit their shape."""


def _check_bits(bits: PackedBits | None) -> None:
    if bits is None:
        raise BitsRejected("no bits for this sample")
    if len(bits.shape) != 4 or min(bits.shape) < 1:
        raise BitsRejected(f"bits shape {bits.shape}, expected (N, L, U, D)")
    want = -(-int(np.prod(bits.shape)) // 8)
    if bits.packed.dtype != np.uint8 or bits.packed.size != want:
        raise BitsRejected(f"{bits.packed.size} packed bytes ({bits.packed.dtype}) for shape {bits.shape}, "
                           f"expected {want} uint8")
