"""Gradient checkpointing of the RL forward (``UniARPolicy.set_gradient_checkpointing``): the same gradients, fewer
activations kept for the backward pass, and generation (KV cache, no grad) unaffected."""
from __future__ import annotations

from perf.grad_checkpointing import measure


def test_same_gradients_fewer_saved_activations():
    m = measure("tiny", ar=64, batch=2)
    assert m["max_grad_diff"] <= 1e-5  # fp32
    # every backbone and visual-decoder layer now keeps its input only: well under half of the activations
    assert m["checkpointing_saved_mib"] < 0.5 * m["plain_saved_mib"]


def test_generation_is_unaffected(tiny_policy):
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    req = [GenerationRequest("a red cat", 64, 64, seed=3)]
    engine = TorchRolloutEngine(tiny_policy)
    before = engine.generate(req)[0]
    tiny_policy.set_gradient_checkpointing(True)
    try:
        after = engine.generate(req)[0]
    finally:
        tiny_policy.set_gradient_checkpointing(False)
    assert (before.bits_packed == after.bits_packed).all()
