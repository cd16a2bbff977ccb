"""Config of the reward models (rewards/, actors/reward_models.py): one ``RewardSpec`` per named reward, combined
by ``RewardConfig``.

A reward is a built-in kind (``REWARD_KINDS``), your own class (YAML key ``class: package.module:ClassName``, with an
optional Ray ``runtime_env`` so that it runs in its own environment), or a server (``backend: http`` + ``url``,
the JSON protocol of ``rewards/http.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from uniar_ray.config.base import ConfigError, check_choice

REWARD_KINDS = ("ocr", "geneval", "hps", "pickscore", "judge", "brightness", "target_color", "self_judge", "http",
                "custom")
# How the reference sent each reward its images (train/rl/reward_funcs.py, reward_server/unified_reward/client.py):
# PIL's JPEG at its default quality 75 to the hps, geneval and ocr servers, JPEG quality 95 to the judge. Every
# other kind gets the decoded pixels unchanged (png: lossless).
REFERENCE_IMAGES = {"hps": ("jpeg", 75), "geneval": ("jpeg", 75), "ocr": ("jpeg", 75), "judge": ("jpeg", 95)}
PIL_JPEG_QUALITY = 75  # what PIL writes when no quality is given (the reference's image.save(buf, format="JPEG"))
# The keys of a Ray runtime_env a reward may set (Ray validates their values when the actors start).
RUNTIME_ENV_KEYS = ("py_modules", "pip", "uv", "conda", "env_vars", "container", "image_uri", "working_dir",
                    "excludes", "config")
DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer yes or no.'


@dataclasses.dataclass
class RewardSpec:
    """One reward model: what it is, its weight in the total, where its weights live, and its Ray resources.

    ``model_path`` is a local folder (no hub downloads), or ``tiny`` for a seeded tiny model written on the fly
    (demos, tests, benchmarks). A field that only some rewards read is an error on the others (``_ONLY_FOR``)."""

    YAML_ALIASES: ClassVar[dict[str, str]] = {"class": "class_path"}  # `class` is a Python keyword

    kind: str = ""  # one of REWARD_KINDS; empty = the name the spec is registered under (see RewardConfig)
    weight: float = 1.0
    # Routing override: the tasks this reward scores. None = the kind's default (geneval -> ["geneval"],
    # ocr -> ["ocr"], every other kind -> every sample).
    tasks: list[str] | None = None
    model_path: str = ""  # geneval: detector; hps/pickscore: CLIP folder; judge: VLM folder; self_judge: UniAR
    clip_path: str = ""  # geneval: CLIP for the colour classifier
    checkpoint: str = ""  # hps: HPS_v2.1_compressed.pt (open_clip layout, converted to transformers on load)
    backend: str = "transformers"  # transformers (in the actor) | vllm (judge, GPU) | http (a reward server at url)
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    batch_size: int = 16  # model forward batch inside one call; http: samples per POST
    max_new_tokens: int = 4096  # judge (the reference's max_tokens)
    # judge: a reply without all three scores: zero (the reference: a missing score counts 0) | nan (a failure)
    missing_score: str = "zero"
    trust_remote_code: bool = False  # judge: let transformers / vLLM run Python shipped in model_path
    target: list[float] | None = None  # brightness: [level in 0..1]; target_color: [r, g, b] in 0..255
    delay_s: float = 0.0  # programmatic kinds: simulated latency per call (tests and benchmarks)
    # The images as the reward receives them: jpeg = encoded at jpeg_quality and decoded again (what the reference's
    # servers received), png = the decoded pixels unchanged. "" / 0 = the kind's reference value (REFERENCE_IMAGES).
    image_format: str = ""
    jpeg_quality: int = 0
    # What the reward reads: pixels (decoded images) | bits (the roll-out's packed bits, no decoding); "" = the
    # kind's (self_judge: bits; a class: pixels unless you say bits, and the class must agree).
    inputs: str = ""
    # Your own class (YAML `class:`): package.module:ClassName implementing rewards.base.RewardModel, built as
    # ClassName(**options) inside its actors.
    class_path: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Passed to Ray for this reward's actors: py_modules, pip, uv, conda, env_vars, container, image_uri, working_dir
    runtime_env: dict[str, Any] | None = None
    # backend http: the server, and how it is called (rewards/http.py)
    url: str = ""
    request_timeout_s: float = 120.0  # one POST; the reference waited up to 600 s
    retries: int = 2  # after the first try (the reference: 3 tries)
    retry_backoff_s: float = 5.0  # wait k x this before retry k (the reference: 5 s, then 10 s)
    concurrency: int = 4  # POSTs in flight per actor
    token_env: str = ""  # name of an environment variable holding a bearer token (read in the reward actor)
    # self_judge: the yes/no question ({prompt} = the sample's prompt), per task overrides, the tiny model's seed
    question: str = DEFAULT_QUESTION
    questions: dict[str, str] = dataclasses.field(default_factory=dict)
    tiny_seed: int = 0
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    timeout_s: float = 600.0  # per actor call; a timed-out call scores NaN and its actor is restarted

    # Fields only some rewards read -> (who reads it, predicate on the spec)
    _ONLY_FOR: ClassVar[dict[str, tuple[str, Any]]] = {
        "max_new_tokens": ("kind judge", lambda s: s.kind == "judge"),
        "missing_score": ("kind judge", lambda s: s.kind == "judge"),
        "trust_remote_code": ("kind judge", lambda s: s.kind == "judge"),
        "clip_path": ("kind geneval", lambda s: s.kind == "geneval"),
        "checkpoint": ("kind hps", lambda s: s.kind == "hps"),
        "options": ("a class (class: ...)", lambda s: bool(s.class_path)),
        "question": ("kind self_judge", lambda s: s.kind == "self_judge"),
        "questions": ("kind self_judge", lambda s: s.kind == "self_judge"),
        "tiny_seed": ("kind self_judge", lambda s: s.kind == "self_judge"),
        **{k: ("backend http", lambda s: s.backend == "http") for k in
           ("url", "request_timeout_s", "retries", "retry_backoff_s", "concurrency", "token_env")},
    }

    def __post_init__(self):
        if self.kind:
            check_choice("reward.kind", self.kind, REWARD_KINDS)
        check_choice("reward.backend", self.backend, ("transformers", "vllm", "http"))
        check_choice("reward.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("reward.missing_score", self.missing_score, ("nan", "zero"))
        if self.image_format:
            check_choice("reward.image_format", self.image_format, ("jpeg", "png"))
        if self.inputs:
            check_choice("reward.inputs", self.inputs, ("pixels", "bits"))
        if self.num_actors < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("reward: num_actors, batch_size and max_new_tokens must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.timeout_s <= 0 or self.delay_s < 0:
            raise ConfigError("reward: num_cpus/num_gpus/delay_s must be >= 0 and timeout_s > 0")
        if not 0 <= self.jpeg_quality <= 100:
            raise ConfigError(f"reward.jpeg_quality={self.jpeg_quality}: must be in 1..100 (0 = the kind's default)")
        if self.request_timeout_s <= 0 or self.retries < 0 or self.retry_backoff_s < 0 or self.concurrency < 1:
            raise ConfigError("reward: request_timeout_s must be > 0, retries and retry_backoff_s >= 0, "
                              "concurrency >= 1")
        if self.runtime_env is not None:
            bad = sorted(set(self.runtime_env) - set(RUNTIME_ENV_KEYS))
            if bad:
                raise ConfigError(f"reward.runtime_env: unknown key(s) {bad}; Ray's keys: "
                                  f"{', '.join(RUNTIME_ENV_KEYS)}")
        if self.kind:
            self._resolve()

    def _resolve(self) -> None:
        """The kind's defaults (image format, inputs) and the rules that need the kind. Idempotent."""
        fmt, quality = REFERENCE_IMAGES.get(self.kind, ("png", 0))
        self.image_format = self.image_format or fmt
        if self.image_format == "jpeg" and not self.jpeg_quality:
            self.jpeg_quality = quality or PIL_JPEG_QUALITY
        self.inputs = self.inputs or ("bits" if self.kind == "self_judge" else "pixels")

    def problems(self, name: str) -> list[str]:
        """What is wrong with this spec under ``name`` (after the kind is known), one line each."""
        key = f"rewards.models.{name}"
        out = []
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(self) if f.name in self._ONLY_FOR}
        for field, (who, applies) in self._ONLY_FOR.items():
            if getattr(self, field) != defaults[field] and not applies(self):
                out.append(f"{key}.{field}: only read by {who} (this reward is kind {self.kind}, backend "
                           f"{self.backend}); remove it")
        if self.image_format == "png" and self.jpeg_quality:
            out.append(f"{key}.jpeg_quality={self.jpeg_quality}: only read with image_format: jpeg")
        if self.backend == "http" and not self.url.startswith(("http://", "https://")):
            out.append(f"{key}.url={self.url!r}: backend http needs url: http://host:port/path")
        tries = self.retries + 1
        worst = tries * self.request_timeout_s + self.retry_backoff_s * self.retries * tries / 2  # sum of k x backoff
        if self.backend == "http" and worst > self.timeout_s:
            out.append(f"{key}: {tries} tries of request_timeout_s={self.request_timeout_s:g} and their "
                       f"backoff take up to {worst:g} s, over the call's timeout_s={self.timeout_s:g}: lower "
                       "request_timeout_s or retries, or raise timeout_s")
        if self.backend == "http" and (self.class_path or self.inputs == "bits"):
            out.append(f"{key}: backend http sends images; it cannot be a class or read bits")
        if self.backend == "vllm" and self.kind != "judge":
            out.append(f"{key}.backend=vllm: only the judge runs on vLLM")
        if self.kind == "custom" and not self.class_path:
            out.append(f"{key}: kind custom needs class: package.module:ClassName")
        if self.class_path and (self.class_path.count(":") != 1 or not all(self.class_path.split(":"))):
            out.append(f"{key}.class={self.class_path!r}: expected package.module:ClassName")
        if self.kind == "http" and self.backend != "http":
            out.append(f"{key}: kind http needs backend: http and a url")
        if self.kind == "self_judge" and (self.backend != "transformers" or self.inputs != "bits"
                                          or self.class_path or self.dtype == "float16"):
            out.append(f"{key}: self_judge runs the UniAR policy in its actors on bits (backend transformers, "
                       "inputs bits, dtype float32 or bfloat16)")
        if self.inputs == "bits" and self.kind not in ("self_judge", "custom") and not self.class_path:
            out.append(f"{key}.inputs=bits: kind {self.kind} reads pixels")
        if self.inputs == "bits" and (self.image_format != "png" or self.jpeg_quality):
            out.append(f"{key}: image_format / jpeg_quality do not apply to a reward that reads bits")
        return out

    @property
    def reads_bits(self) -> bool:
        return self.inputs == "bits"


@dataclasses.dataclass
class RewardConfig:
    """Named rewards combined by a weighted nansum (spec §7.3), each in its own Ray actor pool.

    YAML: ``models: {ocr: {weight: 1.0}, hps: {model_path: ..., checkpoint: ..., num_gpus: 1}}``; the key is the
    reward's name and, unless ``kind`` says otherwise, its kind. A reward with ``class:`` is kind ``custom`` and one
    with ``backend: http`` kind ``http`` unless its name (or ``kind``) is a built-in kind."""

    models: dict[str, RewardSpec] = dataclasses.field(default_factory=dict)
    max_restarts: int = 2  # Ray restarts a dead reward actor this many times
    max_task_retries: int = 1  # a call interrupted by an actor death is retried on the restarted actor
    wire_format: str = "array"  # array: uint8 [H, W, 3] | png: encoded bytes (smaller across nodes)
    max_image_pixels: int = 4096 * 4096  # larger images (and decompression bombs) are rejected per sample
    max_image_bytes: int = 64 * 2**20

    def __post_init__(self):
        problems = []
        for name, spec in self.models.items():
            if not spec.kind:
                if spec.class_path and name not in REWARD_KINDS:
                    spec.kind = "custom"
                elif spec.backend == "http" and name not in REWARD_KINDS:
                    spec.kind = "http"
                elif name not in REWARD_KINDS:
                    raise ConfigError(f"rewards.models.{name}: set kind (one of {', '.join(REWARD_KINDS)}), "
                                      "class: package.module:ClassName, or backend: http with a url")
                else:
                    spec.kind = name
            spec._resolve()
            problems += spec.problems(name)
            need = {"geneval": ("model_path", "clip_path"), "hps": ("model_path",), "pickscore": ("model_path",),
                    "judge": ("model_path",)}.get(spec.kind, ()) if spec.backend != "http" and not spec.class_path \
                else ()
            for key in need:
                if not getattr(spec, key):
                    problems.append(f"rewards.models.{name}: {spec.kind} needs {key} (a local folder, or tiny)")
        if problems:
            raise ConfigError("\n".join(problems))
        check_choice("rewards.wire_format", self.wire_format, ("array", "png"))
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ConfigError("rewards: max_restarts and max_task_retries must be >= 0")
        if self.max_image_pixels <= 0 or self.max_image_bytes <= 0:
            raise ConfigError("rewards: image limits must be positive")

    @property
    def weights(self) -> dict[str, float]:
        return {name: spec.weight for name, spec in self.models.items()}

    @property
    def pixel_rewards(self) -> list[str]:
        """The rewards that read decoded images (the rest read bits: no decoder is needed for them)."""
        return [name for name, spec in self.models.items() if not spec.reads_bits]
