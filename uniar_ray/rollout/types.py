"""The records that travel between the rollout engines, the decoder, the rewards and the trainer.

``Rollout`` carries bits bit-packed (32 KiB per 512x512 image) and the per-bit sampling log-probs; a request that
cannot be served comes back as a ``RolloutError`` naming the request, while the rest of its batch completes.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from uniar_ray.bits import pack_bits, unpack_bits


@dataclasses.dataclass
class GenerationRequest:
    prompt: str
    ar_height: int = 512
    ar_width: int = 512
    seed: int = 0
    temperature: float = 1.0
    cfg_scale: float = 1.0
    cfg_mode: str = "reference"  # reference | shared (see uniar_ray.sampling and the README)
    image: bytes | None = None  # edit mode: the input image, encoded (PNG/JPEG); resized to the AR size
    request_id: str = ""
    return_logprobs: bool = True


@dataclasses.dataclass
class Rollout:
    request_id: str
    prompt: str
    prompt_ids: np.ndarray  # [P] int32, the unpadded conditional prompt
    ar_height: int
    ar_width: int
    bits_shape: tuple[int, int, int, int]  # (N, L, U, D)
    bits_packed: np.ndarray  # [N*L*U*D/8] uint8
    logprobs: np.ndarray | None  # [N, L, U, D] float32: log p(sampled bit) under the sampling distribution
    seed: int = 0
    temperature: float = 1.0
    cfg_scale: float = 1.0
    # The policy version the engine sampled with: the GRPO steps done when the trainer published it (0 = model.path
    # as loaded; -1 = weights set outside a trainer sync). In a synchronous run it equals the step; one_step: step-1.
    weight_version: int = -1
    # Filled in by the GRPO driver after decoding and scoring:
    group: int = -1  # index of the prompt group (G rollouts of one prompt)
    rewards: dict[str, float] = dataclasses.field(default_factory=dict)  # per reward function; NaN = n/a
    reward_details: dict[str, dict] = dataclasses.field(default_factory=dict)  # per reward: its side values, error
    reward: float = float("nan")  # weighted nansum over reward functions
    advantage: float = 0.0
    excluded: str = ""  # why this sample is left out of the loss (decode/reward failure); "" = trained on
    task: str | None = None  # routing tag of the prompt (geneval | ocr | general | None)

    @classmethod
    def from_bits(cls, bits: torch.Tensor, **kw) -> "Rollout":
        return cls(bits_shape=tuple(bits.shape), bits_packed=pack_bits(bits), **kw)

    def bits(self) -> torch.Tensor:
        """Unpacked bits [N, L, U, D] uint8."""
        return unpack_bits(self.bits_packed, self.bits_shape)


_ARRAYS = ("prompt_ids", "bits_packed", "logprobs")


def save_rollouts(path, rollouts: list[Rollout]) -> None:
    """Write rollouts to ``path`` (.npz, no pickle): the arrays as ``<i>/<field>``, the other fields as JSON."""
    import json

    arrays, meta = {}, []
    for i, r in enumerate(rollouts):
        row = {k: v for k, v in dataclasses.asdict(r).items() if k not in _ARRAYS}
        row["has_logprobs"] = r.logprobs is not None
        meta.append(row)
        for k in _ARRAYS:
            if getattr(r, k) is not None:
                arrays[f"{i}/{k}"] = getattr(r, k)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_rollouts(path) -> list[Rollout]:
    """The rollouts ``save_rollouts`` wrote, equal field for field."""
    import json

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        out = []
        for i, row in enumerate(meta):
            has_logprobs = row.pop("has_logprobs")
            row["bits_shape"] = tuple(row["bits_shape"])
            row.update({k: z[f"{i}/{k}"] for k in _ARRAYS if k != "logprobs" or has_logprobs})
            row.setdefault("logprobs", None)
            out.append(Rollout(**row))
    return out


@dataclasses.dataclass
class RolloutError:
    request_id: str
    prompt: str
    error: str  # what was wrong and what to do


@runtime_checkable
class RolloutEngine(Protocol):
    """What the GRPO driver and the eval pipeline need from a rollout engine (torch or vLLM backed)."""

    def generate(self, requests: list[GenerationRequest]) -> list[Rollout | RolloutError]:
        """One result per request, in order."""

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new policy weights in place (names as ``UniARPolicy.state_dict()``), no restart."""

    def stats(self) -> dict[str, float]:
        """Throughput counters (tokens/s, images, seconds)."""
