"""Configs of the AR policy: where it comes from (``ModelConfig``), how it samples (``SamplingConfig``), and the
``jobs.demo`` config that composes them.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config import feasibility
from uniar_ray.config.base import ConfigError, check_choice, check_tree


@dataclasses.dataclass
class ModelConfig:
    """Where the AR policy comes from: a checkpoint root (``ar_model/`` inside it, or the AR model at the root), or
    ``tiny`` for the built-in seeded tiny model used by demos and tests."""

    path: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16
    device: str = "cpu"  # cpu | cuda | cuda:N
    tiny_seed: int = 0
    # Attention kernels, the reference's --attn: sdpa (any device; unmasked flash kernels when nothing is padded),
    # eager, or flash_attention_2 (the flash-attn package, CUDA; variable-length kernels for padded batches).
    attn_impl: str = "sdpa"

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("model.attn_impl", self.attn_impl, ("sdpa", "eager", "flash_attention_2"))


@dataclasses.dataclass
class SamplingConfig:
    """How the AR policy samples bits (spec §4): AR image size, temperature, classifier-free guidance."""

    ar_height: int = 512
    ar_width: int = 512
    temperature: float = 1.0
    cfg_scale: float = 1.0
    # reference: cond and uncond rows draw their bits independently (the published code; reproduces its numbers).
    # shared: both rows feed back the same bits (standard CFG).
    cfg_mode: str = "reference"

    def __post_init__(self):
        for name in ("ar_height", "ar_width"):
            value = getattr(self, name)
            if value <= 0 or value % 32:
                raise ConfigError(f"sampling.{name}={value}: AR sizes must be positive multiples of 32")
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature={self.temperature}: must be > 0")
        if self.cfg_scale < 1:
            raise ConfigError(f"sampling.cfg_scale={self.cfg_scale}: must be >= 1 (1 disables guidance)")
        check_choice("sampling.cfg_mode", self.cfg_mode, ("reference", "shared"))


@dataclasses.dataclass
class DemoConfig:
    """``jobs.demo``: generate a few images with a (tiny or published) policy and write PNGs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(ar_height=128, ar_width=128))
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a red apple on a wooden table"])
    seed: int = 0
    out_dir: str = "runs/demo"

    def __post_init__(self):
        check_tree(self)
        feasibility.check(self)  # what the code would refuse later, refused now

