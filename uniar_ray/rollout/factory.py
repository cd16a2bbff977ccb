"""The rollout engine a config names: one place for the rollout actor (GRPO) and eval's generation stage.

``engine = build_engine(ModelConfig(...), RolloutConfig(...))``; vLLM is imported only when asked for.
"""
from __future__ import annotations

from uniar_ray.config import ModelConfig, RolloutConfig

from .torch_engine import TorchRolloutEngine
from .types import RolloutEngine


def build_engine(model: ModelConfig, rollout: RolloutConfig) -> RolloutEngine:
    if rollout.backend == "vllm":  # imported here: vLLM is heavy and only this backend needs it
        from .vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine.from_model_config(model, max_batch=rollout.max_batch,
                                                   kvcache_gib=rollout.vllm_kvcache_gib)
    from uniar_ray.model.factory import load_policy

    policy = load_policy(model.path, model.dtype, model.device, model.tiny_seed, attn_impl=model.attn_impl)
    return TorchRolloutEngine(policy, max_batch=rollout.max_batch, cuda_graph=rollout.cuda_graph,
                              compile=rollout.compile)
