"""Ray actor hosting a rollout engine (torch now; vLLM through the same ``RolloutEngine`` protocol).

    actor = RolloutEngineActor.options(num_cpus=1).remote(model_cfg)
    results = ray.get(actor.generate.remote([GenerationRequest(...), ...]))   # Rollout (bit-packed) | RolloutError
    ray.get(actor.update_weights.remote(state_dict))                           # in place, no restart
"""
from __future__ import annotations

import time

import ray
import torch

from uniar_ray.config import ModelConfig
from uniar_ray.model.factory import load_policy
from uniar_ray.rollout import GenerationRequest, Rollout, RolloutError, TorchRolloutEngine


@ray.remote(max_restarts=2, max_task_retries=0)
class RolloutEngineActor:
    def __init__(self, model: ModelConfig, backend: str = "torch", max_batch: int = 16, num_threads: int = 0,
                 vllm_kvcache_gib: float = 1.0):
        if num_threads:
            torch.set_num_threads(num_threads)
        if backend == "vllm":  # imported here: vLLM is heavy and only this backend needs it
            from uniar_ray.rollout.vllm_engine import VLLMRolloutEngine

            self.engine = VLLMRolloutEngine.from_model_config(model, max_batch=max_batch, kvcache_gib=vllm_kvcache_gib)
        elif backend == "torch":
            policy = load_policy(model.path, model.dtype, model.device, model.tiny_seed)
            self.engine = TorchRolloutEngine(policy, max_batch=max_batch)
        else:
            raise ValueError(f"rollout backend {backend!r}: expected 'torch' or 'vllm'")
        self._tokens_per_s = _gauge("uniar_rollout_tokens_per_s", "AR image tokens generated per second (last call)")
        self._images = _counter("uniar_rollout_images", "images rolled out")

    def generate(self, requests: list[GenerationRequest]) -> list[Rollout | RolloutError]:
        t0 = time.perf_counter()
        out = self.engine.generate(requests)
        done = [r for r in out if isinstance(r, Rollout)]
        tokens = sum(r.bits_shape[0] for r in done)
        self._tokens_per_s.set(tokens / max(time.perf_counter() - t0, 1e-9))
        if done:
            self._images.inc(len(done))
        return out

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.update_weights(state_dict)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()


def _gauge(name: str, description: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description)


def _counter(name: str, description: str):
    from ray.util.metrics import Counter

    return Counter(name, description=description)
