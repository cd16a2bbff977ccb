"""Config of the reward models (rewards/, actors/reward_models.py): one ``RewardSpec`` per named reward, combined
by ``RewardConfig``.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config.base import ConfigError, check_choice


REWARD_KINDS = ("ocr", "geneval", "hps", "pickscore", "judge", "brightness", "target_color")


@dataclasses.dataclass
class RewardSpec:
    """One reward model: what it is, its weight in the total, where its weights live, and its Ray resources.

    ``model_path`` is a local folder (no hub downloads), or ``tiny`` for a seeded tiny model written on the fly
    (demos, tests, benchmarks). A kind ignores the fields it does not use."""

    kind: str = ""  # one of REWARD_KINDS; empty = the name the spec is registered under
    weight: float = 1.0
    # Routing override: the tasks this reward scores. None = the kind's default (geneval -> ["geneval"],
    # ocr -> ["ocr"], every other kind -> every sample).
    tasks: list[str] | None = None
    model_path: str = ""  # geneval: detector; hps/pickscore: CLIP folder; judge: VLM folder
    clip_path: str = ""  # geneval: CLIP for the colour classifier
    checkpoint: str = ""  # hps: HPS_v2.1_compressed.pt (open_clip layout, converted to transformers on load)
    backend: str = "transformers"  # judge: transformers (CPU or GPU) | vllm (GPU)
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    batch_size: int = 16  # model forward batch inside one call
    max_new_tokens: int = 256  # judge
    missing_score: str = "nan"  # judge: a reply without all three scores -> nan (failure) | zero (reference)
    target: list[float] | None = None  # brightness: [level in 0..1]; target_color: [r, g, b] in 0..255
    delay_s: float = 0.0  # programmatic kinds: simulated latency per call (tests and benchmarks)
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    timeout_s: float = 600.0  # per call; a timed-out call scores NaN and its actor is restarted

    def __post_init__(self):
        if self.kind:
            check_choice("reward.kind", self.kind, REWARD_KINDS)
        check_choice("reward.backend", self.backend, ("transformers", "vllm"))
        check_choice("reward.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("reward.missing_score", self.missing_score, ("nan", "zero"))
        if self.num_actors < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("reward: num_actors, batch_size and max_new_tokens must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.timeout_s <= 0 or self.delay_s < 0:
            raise ConfigError("reward: num_cpus/num_gpus/delay_s must be >= 0 and timeout_s > 0")


@dataclasses.dataclass
class RewardConfig:
    """Named rewards combined by a weighted nansum (spec §7.3), each in its own Ray actor pool.

    YAML: ``models: {ocr: {weight: 1.0}, hps: {model_path: ..., checkpoint: ..., num_gpus: 1}}``; the key is the
    reward's name and, unless ``kind`` says otherwise, its kind."""

    models: dict[str, RewardSpec] = dataclasses.field(default_factory=dict)
    max_restarts: int = 2  # Ray restarts a dead reward actor this many times
    max_task_retries: int = 1  # a call interrupted by an actor death is retried on the restarted actor
    wire_format: str = "array"  # array: uint8 [H, W, 3] | png: encoded bytes (smaller across nodes)
    max_image_pixels: int = 4096 * 4096  # larger images (and decompression bombs) are rejected per sample
    max_image_bytes: int = 64 * 2**20

    def __post_init__(self):
        for name, spec in self.models.items():
            if not spec.kind:
                if name not in REWARD_KINDS:
                    raise ConfigError(f"rewards.models.{name}: set kind (one of {', '.join(REWARD_KINDS)})")
                spec.kind = name
            need = {"geneval": ("model_path", "clip_path"), "hps": ("model_path",), "pickscore": ("model_path",),
                    "judge": ("model_path",)}.get(spec.kind, ())
            for key in need:
                if not getattr(spec, key):
                    raise ConfigError(f"rewards.models.{name}: {spec.kind} needs {key} (a local folder, or tiny)")
        check_choice("rewards.wire_format", self.wire_format, ("array", "png"))
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ConfigError("rewards: max_restarts and max_task_retries must be >= 0")
        if self.max_image_pixels <= 0 or self.max_image_bytes <= 0:
            raise ConfigError("rewards: image limits must be positive")

    @property
    def weights(self) -> dict[str, float]:
        return {name: spec.weight for name, spec in self.models.items()}

