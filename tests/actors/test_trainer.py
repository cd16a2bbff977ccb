"""Trainer actors on DeepSpeed (gloo, CPU): two data-parallel ranks take GRPO steps on a tiny policy."""
from __future__ import annotations

import math

import pytest
import ray
import torch

from actors.trainer import TrainerGroup, trainable
from uniar_ray.config import GRPOConfig, ModelConfig, TrainerConfig
from uniar_ray.model import build_tiny_policy
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rollouts(g: int = 4):
    engine = TorchRolloutEngine(build_tiny_policy(0))
    reqs = [GenerationRequest(p, 64, 64, seed=i) for i, p in enumerate(["a red cat"] * g + ["a blue dog"] * g)]
    out = engine.generate(reqs)
    for i, r in enumerate(out):
        r.group, r.advantage = i // g, [1.0, -1.0, 0.5, -0.5][i % g]
    return out


def test_two_ranks_update_parameters_identically(ray_local):
    grpo = GRPOConfig(num_generations=4, learning_rate=1e-3, beta=0.01)
    group = TrainerGroup(ModelConfig(path="tiny"), grpo, TrainerConfig(world_size=2, micro_batch_size=2), total_steps=5)
    before = group.trainable_state()
    samples = _rollouts()
    m0 = group.train_step(samples)
    assert math.isfinite(m0["loss"]) and m0["grad_norm"] > 0
    assert abs(m0["loss"]) < 1e-3  # on-policy first iteration: loss value 0 (zero-mean advantages), gradient not
    # (clipping: mu = 1 cannot clip, mu = 2 does - test_trainer_grpo.py::test_num_iterations_two_clips_and_one_does_not)
    m1 = group.train_step(samples)
    assert math.isfinite(m1["loss"]) and "kl" in m1
    after = group.trainable_state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(trainable(k) for k in before)
    assert "output_layer_vistok.1.weight" in changed
    states = ray.get([a.trainable_state.remote() for a in group.actors])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # data-parallel ranks stay in sync
