"""The records that go into and come out of a decoder: bit-packed requests, per-sample results or failures.

A ``DecodeRequest`` is what the decoder pool ships to its actors (32 KiB per 512x512 sample); a ``DecodeResult`` holds
either an image or the reason there is none, never a blank image standing in for a failure.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from uniar_ray.bits import pack_bits, unpack_bits

# The constant prompt (and negative prompt) of the reference decoder (spec §8.3).
DECODER_PROMPT = "Please reconstruct this image and restore all the details."


@dataclasses.dataclass
class DecodeRequest:
    bits_packed: np.ndarray  # [ceil(N*L*U*D / 8)] uint8, uniar_ray.bits.pack_bits
    bits_shape: tuple[int, ...]  # (N, L, U, D)
    ar_height: int
    ar_width: int
    seed: int = 0
    # None: the decoder's configured default (DecoderConfig / decode_requests arguments).
    upsampling_ratio: float | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    request_id: str = ""

    @classmethod
    def from_bits(cls, bits: torch.Tensor | np.ndarray, ar_height: int, ar_width: int, **kw) -> "DecodeRequest":
        """bits [N, L, U, D] in {0, 1}."""
        return cls(bits_packed=pack_bits(bits), bits_shape=tuple(int(s) for s in bits.shape), ar_height=ar_height,
                   ar_width=ar_width, **kw)

    @classmethod
    def from_rollout(cls, rollout, **kw) -> "DecodeRequest":
        """From a ``uniar_ray.rollout.Rollout`` (already bit-packed); the seed defaults to the rollout's."""
        kw.setdefault("seed", rollout.seed)
        kw.setdefault("request_id", rollout.request_id)
        return cls(bits_packed=rollout.bits_packed, bits_shape=tuple(rollout.bits_shape), ar_height=rollout.ar_height,
                   ar_width=rollout.ar_width, **kw)

    def bits(self) -> torch.Tensor:
        """Unpacked bits (uint8, ``bits_shape``); raises ValueError when the byte count does not fit the shape."""
        return unpack_bits(self.bits_packed, tuple(self.bits_shape))


@dataclasses.dataclass
class DecodeFailure:
    """Why one sample has no image (bad input, a failed decode, a lost or timed-out actor)."""

    error: str
    index: int = -1  # position in the call's batch

    def __str__(self) -> str:
        return f"sample {self.index}: {self.error}"


@dataclasses.dataclass
class DecodeResult:
    request_id: str
    image: np.ndarray | None  # [H, W, 3] uint8, or None when ``error`` says why
    error: str = ""
    seconds: float = 0.0  # wall time of the call that produced it
    attempts: int = 1  # 1 + retries after a lost / timed-out actor

    @property
    def ok(self) -> bool:
        return self.image is not None

    def pil(self):
        from PIL import Image

        if self.image is None:
            raise ValueError(f"request {self.request_id!r} has no image: {self.error}")
        return Image.fromarray(self.image)


@runtime_checkable
class Decoder(Protocol):
    """What the GRPO driver and the eval pipeline need from a decoder (local or behind the Ray pool)."""

    def decode_requests(self, requests: list[DecodeRequest], upsampling_ratio: float = 2.0,
                        num_inference_steps: int = 28, guidance_scale: float = 1.5) -> list[DecodeResult]:
        """One result per request, in order; the arguments fill the fields a request leaves None."""
