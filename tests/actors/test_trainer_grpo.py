"""GRPO semantics in the DeepSpeed trainer actors (gloo, CPU): the gradient of a generation batch does not depend on
how it is cut into micro-batches and ranks, num_iterations > 1 clips, grpo.ref_model_path is the KL reference and
trainer.gradient_checkpointing leaves the gradients unchanged."""
from __future__ import annotations

import math
import sys

import pytest
import ray
import torch

from actors.trainer import TrainerGroup
from uniar_ray.train_step import batch_counts
from uniar_ray.config import GRPOConfig, ModelConfig, TrainerConfig
from uniar_ray.model import build_tiny_policy, write_tiny_checkpoint
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the lambdas below run inside the actors


@pytest.fixture(scope="module")
def samples():
    """8 rollouts of the tiny policy (2 prompts x 4), advantages set, one excluded."""
    engine = TorchRolloutEngine(build_tiny_policy(0))
    reqs = [GenerationRequest(p, 64, 64, seed=i) for i, p in enumerate(["a red cat"] * 4 + ["a blue dog"] * 4)]
    out = engine.generate(reqs)
    for i, r in enumerate(out):
        r.group, r.advantage = i // 4, [1.0, -1.0, 0.5, -0.5][i % 4]
    out[5].excluded, out[5].advantage = "decode failed (test)", 0.0
    return out


def _gradients(samples, world_size, micro_batch_size, grpo_cfg, **trainer):
    group = TrainerGroup(ModelConfig(path="tiny"), grpo_cfg,
                         TrainerConfig(world_size=world_size, micro_batch_size=micro_batch_size, **trainer), 1)
    try:
        flag = ray.get(group.actors[0].__ray_call__.remote(
            lambda self: self.engine.module.model.language_model.gradient_checkpointing))
        assert flag == trainer["gradient_checkpointing"]  # the option reaches the model
        k = len(samples) // world_size
        counts = batch_counts(samples, num_processes=world_size)
        grads = ray.get([a.gradients.remote(samples[r * k:(r + 1) * k], counts)
                         for r, a in enumerate(group.actors)])
    finally:
        group.shutdown()
    for g in grads[1:]:  # every rank holds the same reduced gradient
        assert all(torch.equal(g[n], grads[0][n]) for n in g)
    return grads[0]


@pytest.mark.slow
def test_gradient_same_for_micro_batches_ranks_and_checkpointing(ray_local, samples):
    """dapo (normalised by the batch's AR tokens; was per micro-batch): 1 micro-batch of 8, 4 of 2, 2 ranks x 2 of 2
    agree to 1e-6 of the gradient's scale (fp32 sums in another order); gradient checkpointing to 1e-5."""
    cfg = GRPOConfig(num_generations=4, beta=0.01, loss_type="dapo")
    one = _gradients(samples, 1, 8, cfg, gradient_checkpointing=False)
    scale = max(v.abs().max().item() for v in one.values())
    assert scale > 1e-4
    for world, mb, ckpt, tol in ((1, 2, False, 1e-6), (2, 2, False, 1e-6), (1, 8, True, 1e-5)):
        other = _gradients(samples, world, mb, cfg, gradient_checkpointing=ckpt)
        worst = max((other[n] - one[n]).abs().max().item() for n in one)
        assert worst <= tol * scale, f"{world} rank(s) x mb {mb}, checkpointing {ckpt}: {worst:.3g} vs {scale:.3g}"


def test_num_iterations_two_clips_and_one_does_not(ray_local, samples):
    """mu = 1: on-policy, ratio exactly 1, nothing clipped. mu = 2 with a large learning rate: the second pass
    scores the updated policy against the old log-probs recorded before the first update, and the clip acts."""
    clip = {}
    for mu in (1, 2):
        cfg = GRPOConfig(num_generations=4, beta=0.0, num_iterations=mu, learning_rate=0.05, max_grad_norm=0.0)
        group = TrainerGroup(ModelConfig(path="tiny"), cfg, TrainerConfig(world_size=1, micro_batch_size=4), 1)
        try:
            m = group.train_step(samples)
        finally:
            group.shutdown()
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
        clip[mu] = m["clip_ratio/region_mean"]
    assert clip[1] == 0.0
    assert clip[2] > 0.01  # averaged over both passes: the first clips nothing


def test_ref_model_path_is_the_kl_reference(ray_local, samples, tmp_path):
    """Default: the reference is the starting policy, KL 0 at the first step. A different ref_model_path (the tiny
    model with another seed): KL > 0 at once."""
    other = write_tiny_checkpoint(tmp_path / "ref", seed=1)
    kl = {}
    for path in ("", str(other)):
        cfg = GRPOConfig(num_generations=4, beta=0.01, ref_model_path=path)
        group = TrainerGroup(ModelConfig(path="tiny"), cfg, TrainerConfig(world_size=1, micro_batch_size=8), 1)
        try:
            kl[path] = group.train_step(samples)["kl"]
        finally:
            group.shutdown()
    assert kl[""] == 0.0
    assert kl[str(other)] > 1e-3
