"""Colocated roll-out (uniar_ray/rollout/colocated.py) over a policy that trains: the same bits as a separate torch
engine with the same weights, the module exactly as it was after each call, and the weights an optimizer wrote in
place behind the tensors' version counters (as DeepSpeed ZeRO-2 does) sampled at the next call."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from uniar_ray.model import build_tiny_policy
from uniar_ray.model.layers import MLP, Attention
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine
from uniar_ray.rollout.colocated import ColocatedEngine

REQS = [("a red cat", 0), ("two dogs on a wooden bench", 1), ("a poster", 2)]


def _reqs():
    return [GenerationRequest(p, 64, 64, seed=s) for p, s in REQS]


def _separate(policy, max_batch: int = 16):
    """A separate engine (fused + packed on CPU, as a rollout actor builds it) over a copy of ``policy``'s weights.
    The same max_batch as the colocated one: a batch's padding moves log-probs in the last bits."""
    copy = build_tiny_policy(0)
    copy.load_state_dict(policy.state_dict())
    return TorchRolloutEngine(copy, max_batch=max_batch)


def _same(a, b) -> bool:
    return all(torch.equal(x.bits(), y.bits()) and np.array_equal(x.logprobs, y.logprobs) for x, y in zip(a, b))


def _module_state(policy):
    return ([(n, type(m).__name__, m.training) for n, m in policy.named_modules()],
            [(n, p.data_ptr()) for n, p in policy.named_parameters()],
            [getattr(m, "qkv", None) or getattr(m, "gate_up", None) for m in policy.modules()
             if isinstance(m, (Attention, MLP))])


def _loss(policy):
    """A training forward/backward (gradient checkpointing on): the loss and one gradient."""
    from uniar_ray.model import generation_text, tokenize

    policy.zero_grad()
    tp = tokenize(policy.tokenizer, [generation_text("a red cat", 64, 64)])
    bits = torch.randint(0, 2, (1, 4, 4, 4, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    loss = policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64).float().square().mean()
    loss.backward()
    return loss.item(), policy.output_layer_vistok[1].weight.grad.clone()


def test_colocated_samples_like_a_separate_engine_and_leaves_the_module_as_it_was():
    policy = build_tiny_policy(0).train()
    policy.set_gradient_checkpointing(True)
    state, loss_before = _module_state(policy), _loss(policy)
    colocated = ColocatedEngine(policy, max_batch=2)  # two batches: the per-call set-up spans both
    assert _module_state(policy) == state  # the constructor leaves it training
    out = colocated.generate(_reqs())
    assert _same(out, _separate(policy, max_batch=2).generate(_reqs()))  # same bits and log-probs, to the last bit
    assert _module_state(policy) == state  # training mode, classes, parameters, no fused modules left
    assert not any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in policy.modules())
    loss_after = _loss(policy)
    assert loss_after[0] == loss_before[0] and torch.equal(loss_after[1], loss_before[1])


def test_second_call_samples_the_weights_updated_in_place():
    policy = build_tiny_policy(0).train()
    colocated = ColocatedEngine(policy)
    first = colocated.generate(_reqs())
    # An optimizer writing in place through other tensors (ZeRO-2 copies its fp32 master into a flat buffer the
    # parameters are views of): storage and version counters of the parameters do not change.
    params = [p for n, p in policy.named_parameters() if not n.startswith(("model.visual.", "lm_head."))]
    versions = [p._version for p in params]
    with torch.no_grad():
        for p in params:
            p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    assert [p._version for p in params] == versions  # what a cache keyed on versions would miss
    second = colocated.generate(_reqs())
    assert not _same(first, second)
    assert _same(second, _separate(policy).generate(_reqs()))  # exactly the updated weights
