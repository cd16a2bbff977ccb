"""Rollout engines: turn prompts into BSQ bits (+ per-bit sampling log-probs) with the UniAR policy.

``TorchRolloutEngine`` is the KV-cached reference path; a vLLM-backed engine satisfies the same ``RolloutEngine``.
"""
from .torch_engine import TorchRolloutEngine
from .types import GenerationRequest, Rollout, RolloutEngine, RolloutError

__all__ = ["TorchRolloutEngine", "GenerationRequest", "Rollout", "RolloutError", "RolloutEngine"]
