"""Config as nested dataclasses, loaded from YAML with ``a.b=c`` command-line overrides: one module per area.

    cfg = load_config(GenerateConfig, "configs/demo.yaml", ["sampling.cfg_scale=2.0"])
``base`` holds the loading machinery and the rules every field obeys; ``model``, ``rollout``, ``decoder``,
``rewards``, ``grpo``, ``trainer`` and ``eval`` hold each area's dataclasses. Import from here.
"""
from uniar_ray.config.base import (ConfigError, apply_override, check_choice, check_tree, check_upsampling_ratio,
                                   field_problem, from_dict, load_config, parse_cli, to_dict, tree_problems)
from uniar_ray.config.decoder import DecoderConfig
from uniar_ray.config.eval import (BENCHMARK_NAMES, BenchmarkConfig, EvalConfig, EvalDecoderConfig,
                                   EvalScoringConfig, EvalSettings, SweepConfig)
from uniar_ray.config.grpo import DataConfig, GRPOConfig, GRPORunConfig, ValidationConfig
from uniar_ray.config.model import DemoConfig, ModelConfig, SamplingConfig
from uniar_ray.config.rewards import REWARD_KINDS, RewardConfig, RewardSpec
from uniar_ray.config.rollout import RolloutConfig
from uniar_ray.config.trainer import ClusterConfig, TrackingConfig, TrainerConfig

__all__ = [
    "BENCHMARK_NAMES", "REWARD_KINDS", "BenchmarkConfig", "ClusterConfig", "ConfigError", "DataConfig",
    "DecoderConfig", "DemoConfig", "EvalConfig", "EvalDecoderConfig", "EvalScoringConfig", "EvalSettings",
    "GRPOConfig", "GRPORunConfig", "ModelConfig", "RewardConfig", "RewardSpec", "RolloutConfig", "SamplingConfig",
    "SweepConfig", "TrackingConfig", "TrainerConfig", "apply_override", "check_choice", "check_tree",
    "check_upsampling_ratio", "field_problem", "from_dict", "load_config", "parse_cli", "to_dict", "tree_problems",
    "ValidationConfig",
]
