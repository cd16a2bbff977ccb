"""Configs of batch evaluation and sweeps (jobs/eval.py, jobs/sweep.py, benchmarks/): which benchmark, the
generation settings, the decoder and scoring stages.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config import feasibility
from uniar_ray.config.base import ConfigError, check_choice, check_tree, check_upsampling_ratio
from uniar_ray.config.model import ModelConfig
from uniar_ray.config.rollout import RolloutConfig
from uniar_ray.config.trainer import ClusterConfig


BENCHMARK_NAMES = ("geneval", "oneig", "longtext", "imgedit", "custom")
# What a sweep can score: a benchmark (an eval run), or "validation": a GRPO run's own validation (its rewards on
# its held-out prompts, jobs/grpo_validation.py), for sweeps over that run's checkpoints.
SWEEP_SCORES = (*BENCHMARK_NAMES, "validation")


@dataclasses.dataclass
class BenchmarkConfig:
    """Which benchmark an eval run writes and where its inputs come from. Empty / zero values mean the
    benchmark's own default (its registered prompt file, samples per prompt, image root; uniar_ray/datasets.py)."""

    name: str = "geneval"
    prompt_file: str = ""
    limit: int = 0  # first N prompts; 0 = all
    skip_bad_lines: bool = False  # report malformed prompt lines and go on instead of failing
    samples_per_prompt: int = 0
    image_root: str = ""  # edit benchmarks: folder holding meta.input_image paths
    image_key: str = ""  # custom: the record field naming an input image under image_root (edit mode)
    model_name: str = "uniar"  # oneig: the <model> folder under text/
    pad_missing: bool = False  # oneig: pad a prompt with missing samples with exactly-black tiles
    # Limits checked before any work is queued. A longer prompt is cut to its first max_prompt_tokens tokens
    # (truncate: the reference's max_prompt_length 1024) or refused (error); 0 = no limit.
    max_prompt_tokens: int = 1024
    prompt_overflow: str = "truncate"  # truncate | error
    max_input_image_pixels: int = 4096 * 4096  # edit inputs over this (from the header) fail for their record only
    max_input_image_bytes: int = 32 * 2**20

    def __post_init__(self):
        check_choice("benchmark.name", self.name, BENCHMARK_NAMES)
        if self.name == "custom" and not self.prompt_file:
            raise ConfigError("benchmark.name=custom needs benchmark.prompt_file=FILE.jsonl ({idx, prompt, meta} "
                              "lines)")
        if self.name == "custom" and bool(self.image_root) != bool(self.image_key):
            raise ConfigError("benchmark.image_root and benchmark.image_key must be set together (edit mode): the "
                              "input image is <image_root>/<the record's image_key value>")
        if self.image_key and self.name != "custom":
            raise ConfigError(f"benchmark.image_key is for benchmark.name=custom ({self.name} has a fixed layout)")
        check_choice("benchmark.prompt_overflow", self.prompt_overflow, ("truncate", "error"))
        if min(self.max_prompt_tokens, self.max_input_image_pixels, self.max_input_image_bytes) < 0:
            raise ConfigError("benchmark: max_prompt_tokens, max_input_image_pixels and max_input_image_bytes must "
                              "be >= 0 (0 = no limit)")
        if self.limit < 0 or self.samples_per_prompt < 0:
            raise ConfigError("benchmark: limit and samples_per_prompt must be >= 0 (0 = default)")
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"benchmark.model_name={self.model_name!r}: a plain folder name")



@dataclasses.dataclass
class EvalSettings:
    """Generation settings of one eval run; 0 means the benchmark's default (``benchmarks.<name>.DEFAULTS``, the
    reference's launch scripts). Sample k of prompt idx uses seed ``seed + idx * samples_per_prompt + k``."""

    ar_height: int = 0
    ar_width: int = 0
    temperature: float = 0.0
    cfg_scale: float = 0.0
    cfg_mode: str = "reference"  # reference | shared (see SamplingConfig)
    upsampling_ratio: float = 0.0  # decoder output = AR size x ratio, in [1, 2]
    num_inference_steps: int = 0  # decoder steps
    guidance_scale: float = 0.0  # decoder CFG
    seed: int = 0

    def __post_init__(self):
        check_choice("settings.cfg_mode", self.cfg_mode, ("reference", "shared"))
        for name in ("ar_height", "ar_width"):
            value = getattr(self, name)
            if value < 0 or value % 32:
                raise ConfigError(f"settings.{name}={value}: a positive multiple of 32 (0 = benchmark default)")
        if self.temperature < 0 or self.num_inference_steps < 0 or self.seed < 0:
            raise ConfigError("settings: temperature, num_inference_steps and seed must be >= 0 (0 = default)")
        if self.cfg_scale and self.cfg_scale < 1:
            raise ConfigError(f"settings.cfg_scale={self.cfg_scale}: must be >= 1 (0 = benchmark default)")
        check_upsampling_ratio("settings.upsampling_ratio", self.upsampling_ratio, zero_means_default=True)
        if self.guidance_scale and self.guidance_scale < 1:
            raise ConfigError(f"settings.guidance_scale={self.guidance_scale}: must be >= 1 (0 = default)")


@dataclasses.dataclass
class EvalDecoderConfig:
    """The decoder stage of the eval pipeline: where the decoder lives and the Ray Data actors that run it."""

    path: str = ""  # checkpoint root (bsq_encoder/, sd3_transformer/, sd3_pipeline/); "" = the model's root
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch: int = 8  # samples per denoising batch inside the decoder
    num_threads: int = 0  # torch threads per actor (0: num_cpus, at least 1)

    def __post_init__(self):
        check_choice("decoder.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.num_actors < 1 or self.max_batch < 1 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("decoder: num_actors and max_batch must be >= 1, num_cpus/num_gpus >= 0")


@dataclasses.dataclass
class EvalScoringConfig:
    """Scoring in the eval job, where local models allow it (ImgEdit's GPT-4o judge never runs here)."""

    enabled: bool = True
    ocr: str = "rapidocr"  # OneIG / LongText text scores: rapidocr | none
    geneval_detector: str = ""  # "" = GenEval is not scored; a local detector folder, or tiny
    geneval_clip: str = ""  # CLIP folder for GenEval's colour classifier (needed with a detector), or tiny
    device: str = "cpu"
    batch_size: int = 8

    def __post_init__(self):
        check_choice("scoring.ocr", self.ocr, ("rapidocr", "none"))
        if self.geneval_detector and not self.geneval_clip:
            raise ConfigError("scoring.geneval_detector is set: also set scoring.geneval_clip (colour classifier)")
        if self.batch_size < 1:
            raise ConfigError("scoring.batch_size must be >= 1")


@dataclasses.dataclass
class EvalConfig:
    """``jobs.eval``: one benchmark, one model, one set of settings, streamed through Ray Data."""

    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # a checkpoint root, or tiny
    settings: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    rollout: RolloutConfig = dataclasses.field(default_factory=lambda: RolloutConfig(max_batch=8))
    decoder: EvalDecoderConfig = dataclasses.field(default_factory=EvalDecoderConfig)
    scoring: EvalScoringConfig = dataclasses.field(default_factory=EvalScoringConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    batch_size: int = 8  # rows per Ray Data batch (one generation call, one decoder call)
    out_dir: str = ""  # "" = runs/eval/<benchmark>
    # out_dir holds a run with other settings (its config.json identity differs): false = refuse, naming the keys;
    # true = delete that run's images and reports, then start over. The same settings always resume.
    overwrite: bool = False
    tiny_cache: str = "runs/.tiny_checkpoint"  # model.path=tiny: the four-folder tiny checkpoint, written once
    preview_prompts: int = 8  # prompts in preview.png
    progress: bool = True  # tqdm bar (images done, images/s)

    def __post_init__(self):
        if self.batch_size < 1 or self.preview_prompts < 0:
            raise ConfigError("eval: batch_size must be >= 1 and preview_prompts >= 0")
        if self.rollout.placement != "separate" or self.rollout.weight_sync != "object_store":
            raise ConfigError("rollout.placement and rollout.weight_sync are GRPO options (eval has no trainer): "
                              "leave them at separate and object_store")
        check_tree(self)
        feasibility.check(self)  # what the code would refuse later, refused now


@dataclasses.dataclass
class SweepConfig:
    """``jobs.sweep``: checkpoints x benchmarks x settings, each an eval run; one results table and a plot.

    Each run starts from ``eval_config`` (``{benchmark}`` is replaced by the benchmark's name), then ``overrides``
    (``a.b=c`` strings, as on the command line), then the checkpoint's model and the setting."""

    checkpoints: dict[str, ModelConfig] = dataclasses.field(default_factory=dict)
    # A GRPO run folder: its complete checkpoints join the sweep as ``step-NNNNNN`` (each one's model/ folder; dtype
    # and device from the run's config.json). grpo_steps picks some of them; empty = all. With a grpo_run,
    # benchmarks may list "validation": every checkpoint scored as the run validated (its rewards, held-out
    # prompts, sampling and decoding; settings and overrides apply to the benchmarks only).
    grpo_run: str = ""
    grpo_steps: list[int] = dataclasses.field(default_factory=list)
    benchmarks: list[str] = dataclasses.field(default_factory=lambda: ["geneval"])
    settings: list[EvalSettings] = dataclasses.field(default_factory=lambda: [EvalSettings()])
    eval_config: str = "configs/eval/{benchmark}.yaml"
    overrides: list[str] = dataclasses.field(default_factory=list)
    out_dir: str = "runs/sweep"
    overwrite: bool = False  # a cell folder made with other settings: false = refuse; true = clear it (see EvalConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    def __post_init__(self):
        for name in self.benchmarks:
            check_choice("sweep.benchmarks[]", name, SWEEP_SCORES)
        if "validation" in self.benchmarks and not self.grpo_run:
            raise ConfigError("sweep.benchmarks lists validation (a GRPO run's own rewards on its held-out prompts): "
                              "also set grpo_run (the run folder whose config says which)")
        if not (self.checkpoints or self.grpo_run) or not self.benchmarks or not self.settings:
            raise ConfigError("sweep: checkpoints (or grpo_run), benchmarks and settings must each list at least one "
                              "entry")
        if self.grpo_steps and not self.grpo_run:
            raise ConfigError("sweep.grpo_steps is set: also set grpo_run (the GRPO run folder they belong to)")
        bad = [name for name in self.checkpoints if not name or "/" in name]
        if bad:
            raise ConfigError(f"sweep.checkpoints: names are folder names, got {bad}")
        check_tree(self)

