"""The train/rollout gap on real roll-outs of the tiny policy, through the trainer's own micro-batch path
(train_step.prepare + micro_loss): an engine holding the trainer's weights shows none, an engine whose weights carry
a known perturbation shows exactly the log-prob difference the two policies give those bits, and engine log-probs
shifted by a known amount show that shift, its ratio and the cap."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from uniar_ray import grpo, train_step
from uniar_ray.config import GRPOConfig
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

CFG = GRPOConfig(beta=0.0, num_generations=2)
GAP = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max")


@pytest.fixture(scope="module")
def perturbed(tiny_policy):
    """The trainer's policy with N(0, 0.05^2) added to the bit head's last layer (seeded): another engine."""
    other = copy.deepcopy(tiny_policy)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        w = dict(other.named_parameters())[_head_weight(other)]
        w.add_(0.05 * torch.randn(w.shape, generator=g))
    return other


def _head_weight(policy) -> str:
    names = [n for n, _ in policy.named_parameters() if n.startswith("output_layer_vistok") and n.endswith("weight")]
    return names[-1]


def _rollouts(policy):
    reqs = [GenerationRequest(f"a red {x}", 64, 64, seed=i, request_id=str(i))
            for i, x in enumerate(["cat", "cat", "dog", "dog"])]
    out = TorchRolloutEngine(policy).generate(reqs)
    for r, adv in zip(out, (1.0, -1.0, 0.5, -0.5)):
        r.advantage = adv
    return out


def _gap(trainer, rollouts):
    x = train_step.prepare(rollouts, trainer, None, trainer.tokenizer.pad_token_id, CFG, "cpu")
    _, metrics = train_step.micro_loss(trainer, x, train_step.batch_counts(rollouts, 1), CFG)
    return x, metrics


def test_an_engine_with_the_trainers_weights_shows_no_gap(tiny_policy):
    _, m = _gap(tiny_policy, _rollouts(tiny_policy))
    assert m["sampling/sampling_logp_difference/max"] < 1e-4
    assert m["sampling/importance_sampling_capped_frac"] == 0.0
    assert abs(m["sampling/importance_sampling_ratio/mean"] - 1) < 1e-5


def test_a_perturbed_engine_shows_its_perturbation(tiny_policy, perturbed):
    rollouts = _rollouts(perturbed)
    x, m = _gap(tiny_policy, rollouts)
    with torch.no_grad():  # independently: each policy's teacher-forced log-prob of the same bits
        mine = grpo.bit_logprobs(tiny_policy(x.ids, x.mask, x.bits, x.h, x.w), x.bits, CFG)
        theirs = grpo.bit_logprobs(perturbed(x.ids, x.mask, x.bits, x.h, x.w), x.bits, CFG)
    diff = (mine - theirs).flatten()
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(diff.abs().mean().item(), rel=1e-3)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(diff.abs().max().item(), rel=1e-3)
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(diff.exp().min().item(), rel=1e-3)
    assert m["sampling/sampling_logp_difference/mean"] > 100 * 1e-5  # far above the float noise of the test above


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_log_probs_shifted_by_a_known_amount(tiny_policy, shift):
    rollouts = _rollouts(tiny_policy)
    for r in rollouts:  # the engine found every sampled bit e^shift times less likely than the trainer does
        r.logprobs = r.logprobs - shift
    _, m = _gap(tiny_policy, rollouts)
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(shift, abs=1e-4)
    ratio = min(math.exp(shift), CFG.vllm_importance_sampling_cap)
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(ratio, rel=1e-4)
    assert m["sampling/importance_sampling_capped_frac"] == (1.0 if math.exp(shift) > 2.0 else 0.0)
