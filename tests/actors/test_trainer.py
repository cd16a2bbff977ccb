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
    try:  # the group's placement group holds both CPUs of this Ray until shut down
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
    finally:
        group.shutdown()


@pytest.mark.slow
def test_zero3_matches_zero2_and_engines_load_full_tensors(ray_local):
    """ZeRO-3 partitions every parameter across the ranks; the engine's forward gathers them for the loss and the
    weight publish gathers them for the engines: two steps give ZeRO-2's weights, and an engine loads them."""
    from actors.rollout_engine import RolloutEngineActor

    samples = _rollouts()
    states = {}
    for stage in (2, 3):
        group = TrainerGroup(ModelConfig(path="tiny"), GRPOConfig(num_generations=4, learning_rate=1e-3, beta=0.01),
                             TrainerConfig(world_size=2, micro_batch_size=2, zero_stage=stage, num_cpus=0.5),
                             total_steps=5)
        try:
            for _ in range(2):
                assert math.isfinite(group.train_step(samples)["loss"])
            states[stage] = group.trainable_state()
            if stage == 3:  # the engine fetches rank 0's object while rank 0 (its owner) is alive
                published = group.publish_weights(version=2)
                engine = RolloutEngineActor.remote(ModelConfig(path="tiny"))
                assert ray.get(engine.update_weights.remote(published.ref, published.version)) == 2
                (out,) = ray.get(engine.generate.remote([GenerationRequest("a red cat", 64, 64, seed=0)]))
                assert out.weight_version == 2
                full = ray.get(published.ref)
                ray.kill(engine)
        finally:
            group.shutdown()
    z2, z3 = states[2], states[3]
    start = build_tiny_policy(0).state_dict()
    assert z2.keys() == z3.keys() == full.keys()
    assert max((z2[k] - z3[k]).abs().max().item() for k in z2) < 1e-5
    assert any(not torch.equal(start[k], z3[k]) for k in z3)  # the steps moved the weights
    assert all(full[k].shape == start[k].shape and torch.equal(full[k], z3[k]) for k in full)  # not ZeRO-3 shards


def test_trainers_that_cannot_be_placed_fail_with_what_is_free(ray_local):
    """More CPUs than the cluster has: a clear error within trainer.placement_timeout_s, never a hang."""
    with pytest.raises(RuntimeError, match=r"could not be placed within trainer.placement_timeout_s=2 s; free"):
        TrainerGroup(ModelConfig(path="tiny"), GRPOConfig(), TrainerConfig(world_size=2, num_cpus=4,
                                                                           placement_timeout_s=2), total_steps=1)
    assert ray.available_resources().get("CPU") == 2  # the refused placement group was removed
