"""Configs of the trainer actors (actors/trainer.py), the Ray cluster a job runs on, and experiment tracking.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config.base import ConfigError, check_choice


@dataclasses.dataclass
class TrainerConfig:
    """Data-parallel trainer actors: DeepSpeed ZeRO (gloo + torch AdamW on CPU, NCCL on GPU)."""

    world_size: int = 1
    micro_batch_size: int = 2  # samples per forward/backward (the reference's per_device_train_batch_size)
    zero_stage: int = 2  # 2 or 3
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_threads: int = 0  # torch threads per actor (0: torch's default)
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    timeout_s: float = 3600.0  # per driver wait on the trainers (a step, a weight publish, a checkpoint)
    placement_timeout_s: float = 300.0  # wait for the ranks' resources at start; past it: an error naming them
    # Recompute layer activations in the backward pass (on in the reference, TRL's default): same gradients,
    # activation memory per micro-batch ~ one layer instead of all of them, about one extra forward of compute.
    gradient_checkpointing: bool = True

    def __post_init__(self):
        if not (self.timeout_s > 0 and self.placement_timeout_s > 0):
            raise ConfigError("trainer.timeout_s and trainer.placement_timeout_s must be > 0")
        if self.world_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("trainer.world_size and trainer.micro_batch_size must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"trainer.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        check_choice("trainer.placement_strategy", self.placement_strategy,
                      ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclasses.dataclass
class ClusterConfig:
    """Where Ray runs: an address (``auto`` inside ``ray job submit``) or an embedded local instance."""

    address: str = ""  # "" = start a local Ray in the job; "auto" = join the running cluster
    num_cpus: int = 0  # local Ray only; 0 = all cores
    dashboard: bool = False  # local Ray only: start the dashboard (metrics, actor health)
    log_to_driver: bool = False


@dataclasses.dataclass
class TrackingConfig:
    """Experiment trackers for the GRPO job (uniar_ray/tracking.py), both off by default; each logs the keys of
    metrics.jsonl at their step."""

    tensorboard: bool = False  # event files under <run_dir>/tensorboard
    wandb: bool = False  # Weights & Biases, files under <run_dir>/wandb
    wandb_mode: str = "offline"  # offline (no network; `wandb sync <run_dir>/wandb/offline-run-*` later) | online
    wandb_project: str = "uniar_grpo"  # the reference's WANDB_PROJECT
    wandb_name: str = ""  # "" = the run folder's name

    def __post_init__(self):
        check_choice("tracking.wandb_mode", self.wandb_mode, ("offline", "online"))

