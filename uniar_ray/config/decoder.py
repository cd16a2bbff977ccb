"""Config of the visual decoder pool (uniar_ray/decoder/, actors/decoder_pool.py): checkpoint, decode defaults,
actors, batching, backpressure, timeouts and retries.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config.base import ConfigError, check_choice, check_upsampling_ratio


@dataclasses.dataclass
class DecoderConfig:
    """The visual decoder behind the Ray decoder pool: which checkpoint, the decode defaults a request may leave
    unset, and the pool's actors, batching, backpressure, timeout and retries."""

    path: str = "tiny"  # checkpoint root (bsq_encoder/, sd3_transformer/, sd3_pipeline/), or tiny (seeded)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    tiny_seed: int = 0
    # tiny only: initialised so that the pixel colours follow the bits (the GRPO demo's decoder; see
    # uniar_ray/decoder/tiny.py::make_bit_driven). The random tiny decoder's pixels barely depend on them.
    tiny_bit_driven: bool = False
    # None: the bsq_encoder config.json value when it has one, else true (the reference library's value; its decode
    # server defaults to false, which passes deepstack levels through merger.norm).
    inference_skip_final_layernorm: bool | None = None
    upsampling_ratio: float = 2.0  # output = AR size x ratio, snapped to multiples of 16; in [1, 2]
    num_inference_steps: int = 28
    guidance_scale: float = 1.5  # <= 1 disables CFG
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_threads: int = 0  # torch threads per actor (0: torch's default)
    max_batch: int = 8  # samples per denoising batch, and per actor call
    max_inflight_per_actor: int = 2  # calls queued per actor before submit() blocks (backpressure)
    timeout_s: float = 600.0  # per actor call; a timed-out actor is killed (Ray restarts it) and the call retried
    max_restarts: int = 2  # Ray restarts a dead decoder actor this many times
    max_retries: int = 2  # a call whose actor died or timed out is resubmitted this many times, then fails

    def __post_init__(self):
        check_choice("decoder.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_upsampling_ratio("decoder.upsampling_ratio", self.upsampling_ratio)
        if self.tiny_bit_driven and self.path != "tiny":
            raise ConfigError(f"decoder.tiny_bit_driven applies to decoder.path=tiny only, not {self.path!r}")
        if self.num_inference_steps < 1:
            raise ConfigError("decoder.num_inference_steps must be >= 1")
        if min(self.num_actors, self.max_batch, self.max_inflight_per_actor) < 1:
            raise ConfigError("decoder: num_actors, max_batch and max_inflight_per_actor must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_threads < 0 or self.timeout_s <= 0:
            raise ConfigError("decoder: num_cpus/num_gpus/num_threads must be >= 0 and timeout_s > 0")
        if self.max_restarts < 0 or self.max_retries < 0:
            raise ConfigError("decoder: max_restarts and max_retries must be >= 0")
