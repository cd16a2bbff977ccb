"""Configs of GRPO training (uniar_ray/grpo.py, jobs/grpo.py): the hyper-parameters, the RL prompt data, and
``GRPORunConfig``, which composes every area a run needs.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config import feasibility
from uniar_ray.config.base import ConfigError, check_choice, check_tree, check_upsampling_ratio
from uniar_ray.config.decoder import DecoderConfig
from uniar_ray.config.model import ModelConfig
from uniar_ray.config.rewards import RewardConfig
from uniar_ray.config.rollout import RolloutConfig
from uniar_ray.config.trainer import ClusterConfig, TrackingConfig, TrainerConfig


@dataclasses.dataclass
class GRPOConfig:
    """GRPO hyper-parameters, with the reference's names and its launch-script values (spec §7.8; where the launch
    script and TRL's GRPOConfig differ, the launch script wins: lr 5e-6 not 1e-6, beta 0.01 not 0.0)."""

    # Optimiser and schedule (AdamW; max_grad_norm 0 = no clipping)
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "linear"  # linear | constant
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # Groups and sampling
    num_generations: int = 16  # G rollouts per prompt
    num_iterations: int = 1  # optimizer steps per generation batch
    temperature: float = 1.0
    # Advantages (spec §7.5)
    scale_rewards: str | bool = "group"  # group (True) | batch | none (False)
    # Rows no reward applies to: zero (the reference: they score 0, with a warning) | exclude (left out of the group
    # statistics and the loss)
    all_nan_rewards: str = "zero"
    # Failure budget: the job stops, naming the causes, when more than this fraction of the prompt groups was
    # excluded (failed decodes or rewards, no applicable reward) over the last failure_window steps; 1.0 = never
    max_excluded_fraction: float = 0.5
    failure_window: int = 3
    # Loss (spec §7.7)
    beta: float = 0.01  # k3 KL weight; 0 = no reference policy
    ref_model_path: str = ""  # the frozen KL reference (the reference's ref_model_name_or_path); "" = model.path
    epsilon: float = 0.2  # lower clip
    epsilon_high: float | None = None  # upper clip; None = epsilon
    delta: float | None = None  # two-sided clipping: upper bound on the ratio (must be > 1)
    importance_sampling_level: str = "token"  # token (per bit) | sequence (per image)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    loss_use_float: bool = True  # score the bit logits in fp32
    logits_use_temperature: bool = True  # divide the logits by temperature before the log-softmax
    bsq_loss_normalize: bool = False  # grpo: per-sample sum over bits / N (1024x the default scale, spec §7.7)
    max_completion_length: int = 256  # only used by dr_grpo's denominator (a text length; kept for parity)
    # Truncated importance sampling against the rollout engine's per-bit log-probs (TRL's names; here it applies
    # to any rollout engine, torch or vLLM)
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = 2.0
    # Decoding of rollouts for the rewards
    decode_num_inference_steps: int = 14
    decode_cfg_scale: float = 1.0  # 1.0 = no decoder CFG

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        check_choice("grpo.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        check_choice("grpo.all_nan_rewards", self.all_nan_rewards, ("exclude", "zero"))
        if not 0.0 <= self.max_excluded_fraction <= 1.0 or self.failure_window < 1:
            raise ConfigError(f"grpo.max_excluded_fraction={self.max_excluded_fraction} must be in [0, 1] and "
                              f"grpo.failure_window={self.failure_window} >= 1")
        check_choice("grpo.lr_scheduler_type", self.lr_scheduler_type, ("linear", "constant"))
        check_choice("grpo.importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        check_choice("grpo.loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo"))
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations={self.num_generations}: GRPO needs at least 2 samples per "
                              "prompt to compute group advantages")
        if self.num_iterations < 1 or self.warmup_steps < 0:
            raise ConfigError("grpo.num_iterations must be >= 1 and grpo.warmup_steps >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature={self.temperature}: must be > 0")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("grpo.learning_rate, weight_decay and max_grad_norm must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_epsilon <= 0:
            raise ConfigError("grpo.adam_beta1/adam_beta2 must be in [0, 1) and adam_epsilon > 0")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta={self.beta}: the KL weight must be >= 0")
        if self.ref_model_path and self.beta == 0:
            raise ConfigError(f"grpo.ref_model_path={self.ref_model_path!r} with grpo.beta=0: no KL term, so no "
                              "reference model is loaded; set grpo.beta > 0 or leave ref_model_path empty")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"grpo.epsilon={self.epsilon}: the lower clip must be in [0, 1)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"grpo.epsilon_high={self.epsilon_high}: must be >= 0 (or null = epsilon)")
        if self.delta is not None and self.delta <= 1:
            raise ConfigError(f"grpo.delta={self.delta}: the upper bound on the ratio must be > 1 (or null = off); "
                              "at or below 1 it cuts the on-policy ratio itself")
        if self.max_completion_length < 1:
            raise ConfigError("grpo.max_completion_length must be >= 1")
        if self.vllm_importance_sampling_cap <= 0:
            raise ConfigError(f"grpo.vllm_importance_sampling_cap={self.vllm_importance_sampling_cap}: must be > 0")
        if self.decode_num_inference_steps < 1 or self.decode_cfg_scale < 1:
            raise ConfigError("grpo.decode_num_inference_steps must be >= 1 and grpo.decode_cfg_scale >= 1")


@dataclasses.dataclass
class DataConfig:
    """RL prompts: a JSONL file or a YAML mix (spec §7.1-7.2), and how many prompts a step takes.

    A relative ``path`` is looked up in the working directory, the repository root, then as a registered data name
    (uniar_ray/datasets.py: the mirror, the cache, or a verified download)."""

    path: str = "uniar/rl_demo/demo_mix.yaml"
    prompt_key: str = "instruction"
    prompts_per_step: int = 32  # the reference: 512 samples per optimizer step / G 16
    seed: int = 42  # mix sampling and the per-epoch prompt order
    shuffle: bool = True  # the reference's shuffle_dataset
    skip_bad_lines: bool = False  # log, count and skip malformed lines instead of failing
    max_prompt_tokens: int = 1024  # the reference's max_prompt_length; 0 = no limit
    prompt_overflow: str = "truncate"  # a longer prompt: truncate (to its first max_prompt_tokens tokens) | error

    def __post_init__(self):
        check_choice("data.prompt_overflow", self.prompt_overflow, ("truncate", "error"))
        if self.max_prompt_tokens < 0:
            raise ConfigError(f"data.max_prompt_tokens={self.max_prompt_tokens}: must be >= 0 (0 = no limit)")
        if not self.path.endswith((".jsonl", ".yaml", ".yml")):
            raise ConfigError(f"data.path={self.path!r}: must end in .jsonl (records) or .yaml/.yml (a mix)")
        if not self.prompt_key:
            raise ConfigError("data.prompt_key must not be empty")
        if self.prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step={self.prompts_per_step}: must be >= 1")


@dataclasses.dataclass
class RolloutDumpConfig:
    """Every sample inspectable (uniar_ray/gallery.py): at the first step, every ``dump_every`` steps and the last,
    each sample's PNG and JSON record and a gallery page under ``<run_dir>/rollouts/step-N/``; W&B also gets the
    samples as a table. 0 = off. A dump holds every image of the step (512 at the reference's batch): mind the disk."""

    dump_every: int = 0

    def __post_init__(self):
        if self.dump_every < 0:
            raise ConfigError(f"rollouts.dump_every={self.dump_every}: must be >= 0 (0 = off)")


@dataclasses.dataclass
class ValidationConfig:
    """Validation during training (jobs/grpo_validation.py): a fixed held-out prompt set, sampled with the same
    seeds every time by the run's own actors and scored by the run's rewards; before the first step, every
    ``every`` steps and after the last. Figures: ``val/<reward>/mean`` and ``val/reward_mean`` in the metrics row
    of the step whose policy they measure (step s: the policy after s updates, which step s samples from)."""

    every: int = 0  # steps between validations; 0 = none (held-out prompts are still held out)
    holdout: int = 0  # prompts of data.path held out of training (chosen with data.seed), never trained on
    prompt_file: str = ""  # or: a JSONL / YAML mix of validation prompts (data.path's format); "" = holdout
    num_generations: int = 4  # samples per prompt
    seed: int = 1234  # the samples' fixed seeds derive from it (the same at every validation)
    temperature: float = 0.0  # 0 = grpo.temperature (the distribution the run trains on)
    at_start: bool = True  # also validate the starting policy (step 0, before any update)

    def __post_init__(self):
        if self.every < 0 or self.holdout < 0 or self.num_generations < 1 or self.temperature < 0:
            raise ConfigError("validation: every and holdout must be >= 0, num_generations >= 1 and temperature "
                              ">= 0 (0 = grpo.temperature)")
        if self.holdout and self.prompt_file:
            raise ConfigError(f"validation.holdout={self.holdout} and validation.prompt_file={self.prompt_file!r}: "
                              "choose one source of validation prompts")
        if self.prompt_file and not self.prompt_file.endswith((".jsonl", ".yaml", ".yml")):
            raise ConfigError(f"validation.prompt_file={self.prompt_file!r}: must end in .jsonl (records) or "
                              ".yaml/.yml (a mix), like data.path")
        if self.every and not (self.holdout or self.prompt_file):
            raise ConfigError(f"validation.every={self.every} needs validation prompts: set validation.holdout=N "
                              "(N prompts of data.path, never trained on) or validation.prompt_file=FILE")


@dataclasses.dataclass
class GRPORunConfig:
    """Everything one GRPO run needs; ``configs/grpo_demo.yaml`` is the embedded CPU demo."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    rollouts: RolloutDumpConfig = dataclasses.field(default_factory=RolloutDumpConfig)
    ar_height: int = 512  # the reference's IMAGE_HEIGHT / IMAGE_WIDTH in RL (N = 256)
    ar_width: int = 512
    decode_upsampling_ratio: float = 1.0  # RL decodes at the AR size (the reference's decode server)
    # The decoder's initial noise per image. sample (default, the reference's behaviour: its RL decode server
    # draws fresh noise for every image): its own per sample, reproducible from the sample's seed. group: shared by
    # the G samples of a prompt, new per group. fixed: the same noise (seed grpo.seed) for every sample of every
    # step - a variance reduction for small demos (reward differences then come from the bits alone), not what the
    # reference trains with.
    decode_seed: str = "sample"
    steps: int = 500
    async_mode: str = "sync"  # sync | one_step (decode + score of step k overlap the roll-out of step k+1)
    run_dir: str = "runs/grpo"
    save_every: int = 50
    keep_checkpoints: int = 10
    grid_every: int = 1

    def __post_init__(self):
        for name in ("ar_height", "ar_width"):
            v = getattr(self, name)
            if v <= 0 or v % 32:
                raise ConfigError(f"{name}={v}: AR sizes must be positive multiples of 32")
        check_choice("async_mode", self.async_mode, ("sync", "one_step"))
        check_choice("decode_seed", self.decode_seed, ("fixed", "group", "sample"))
        if self.steps < 1 or self.save_every < 1 or self.grid_every < 1:
            raise ConfigError("steps, save_every and grid_every must be >= 1")
        batch = self.data.prompts_per_step * self.grpo.num_generations
        per_rank = self.trainer.world_size
        if batch % per_rank:
            raise ConfigError(f"{batch} samples per step (data.prompts_per_step x grpo.num_generations) do not split "
                              f"evenly across trainer.world_size={per_rank}")
        if not self.rewards.models:
            raise ConfigError("rewards.models is empty: configure at least one reward")
        for spec in self.rewards.models.values():  # the model judging its own bits: by default the KL reference
            if spec.kind == "self_judge" and not spec.model_path:
                spec.model_path = self.grpo.ref_model_path or self.model.path
                if spec.model_path == "tiny":
                    spec.tiny_seed = self.model.tiny_seed
        check_upsampling_ratio("decode_upsampling_ratio", self.decode_upsampling_ratio)
        if self.rollout.placement == "colocated" and self.trainer.zero_stage == 3:
            raise ConfigError("rollout.placement=colocated with trainer.zero_stage=3: ZeRO-3 splits every parameter "
                              "across the ranks and colocated rollout reads each rank's parameters whole; use "
                              "trainer.zero_stage=2 (every rank holds the full weights, the optimizer state is "
                              "split), or rollout.placement=separate")
        check_tree(self)
        feasibility.check(self)  # what the code would refuse later, refused now

