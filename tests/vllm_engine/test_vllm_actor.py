"""The rollout actor with ``backend="vllm"`` on local Ray: the tiny model, the same bits as the torch engine, and an
in-place weight update through the actor (what the GRPO driver's weight sync calls)."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from actors.rollout_engine import RolloutEngineActor
from uniar_ray.config import ModelConfig, RolloutConfig
from uniar_ray.model import build_tiny_policy
from uniar_ray.rollout import GenerationRequest, Rollout, TorchRolloutEngine

pytestmark = pytest.mark.slow  # a Ray start plus a vLLM start (~40 s on 2 cores)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_vllm_backend_in_the_rollout_actor(ray_local):
    actor = RolloutEngineActor.options(num_cpus=1).remote(ModelConfig(path="tiny"), RolloutConfig(backend="vllm", max_batch=4))
    reqs = [GenerationRequest("a red cat", 64, 64, seed=1), GenerationRequest("a blue dog", 64, 64, seed=2)]
    out = ray.get(actor.generate.remote(reqs))
    ref = TorchRolloutEngine(build_tiny_policy(0)).generate(reqs)
    for a, b in zip(out, ref):
        assert isinstance(a, Rollout) and a.bits_packed.dtype == np.uint8
        assert torch.equal(a.bits(), b.bits()) and np.abs(a.logprobs - b.logprobs).max() <= 1e-4
    assert ray.get(actor.stats.remote())["images"] == 2
    ray.get(actor.update_weights.remote(build_tiny_policy(1).state_dict()))
    new = ray.get(actor.generate.remote(reqs))
    for a, b in zip(new, TorchRolloutEngine(build_tiny_policy(1)).generate(reqs)):
        assert torch.equal(a.bits(), b.bits())
    ray.kill(actor)
