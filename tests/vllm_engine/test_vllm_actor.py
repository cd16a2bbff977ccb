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


def test_vllm_engine_takes_a_collective_broadcast(ray_local):
    """weight_sync=collective into the vLLM engine: buckets land in buffers, then one update (whole modules)."""
    from actors.trainer import TrainerGroup, trainable
    from actors.weight_sync import WeightSync
    from uniar_ray.config import GRPOConfig, TrainerConfig

    rollout = RolloutConfig(backend="vllm", max_batch=4, weight_sync="collective", timeout_s=300)
    actor = RolloutEngineActor.options(num_cpus=0.5).remote(ModelConfig(path="tiny"), rollout)
    trainer = TrainerGroup(ModelConfig(path="tiny", tiny_seed=1), GRPOConfig(num_generations=2, beta=0.0),
                           TrainerConfig(num_cpus=0.5), total_steps=1)
    try:
        ws = WeightSync(trainer, [actor], rollout, "cpu", bucket_numel=20_000)
        ws.sync(1)
        assert ws.weights.ref is None and ray.get(actor.weights_version.remote()) == 1
        want = build_tiny_policy(0)  # the engine's frozen parts (seed 0) with the trainer's trainable ones (seed 1)
        want.load_state_dict({k: v for k, v in build_tiny_policy(1).state_dict().items() if trainable(k)}, strict=False)
        reqs = [GenerationRequest("a red cat", 64, 64, seed=1), GenerationRequest("a blue dog", 64, 64, seed=2)]
        for a, b in zip(ray.get(actor.generate.remote(reqs, ws.weights)), TorchRolloutEngine(want).generate(reqs)):
            assert torch.equal(a.bits(), b.bits())
    finally:
        ray.kill(actor)
        trainer.shutdown()
