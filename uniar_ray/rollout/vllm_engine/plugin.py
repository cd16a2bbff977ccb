"""vLLM plugin entry point: registers UniAR as an out-of-tree vLLM model in every vLLM process.

Declared in pyproject.toml under ``[project.entry-points."vllm.general_plugins"]``; vLLM calls ``register()`` in the
main process, EngineCore and each (spawned) worker, which is why registering only in the caller is not enough.
"""
from __future__ import annotations

ARCHITECTURE = "UniARForImageGeneration"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A string target keeps the model module (and torch work) out of processes that never build it.
        ModelRegistry.register_model(ARCHITECTURE, "uniar_ray.rollout.vllm_engine.model:UniARForImageGeneration")
