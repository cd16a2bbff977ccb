"""GRPO semantics over a generation batch: a hand-derived clipped loss (num_iterations > 1 makes later passes
off-policy), and the whole-batch normalisation (1 micro-batch == 4 micro-batches == 2 ranks x 2 micro-batches)."""
from __future__ import annotations

import math

import pytest
import torch

from uniar_ray import grpo
from uniar_ray.config import GRPOConfig


def test_hand_derived_clipped_loss_two_samples():
    """2 samples x 1 AR token x 2 bits, old p = 0.5 everywhere, epsilon 0.2, A = (+1, -1).

    sample 0: p = (0.8, 0.5) -> rho = (1.6, 1.0); A > 0 so min(rho, clip(rho)) = (1.2, 1.0): loss terms (-1.2, -1).
    sample 1: p = (0.25, 0.5) -> rho = (0.5, 1.0); A < 0 so -min(-rho, -clip(rho)) = (0.8, 1.0).
    grpo: mean over samples of the per-sample mean = ((-1.2 - 1) / 2 + (0.8 + 1) / 2) / 2 = -0.1.
    Clipped bits: 1 high (rho > 1.2, A > 0) and 1 low (rho < 0.8, A < 0) of 4 -> 0.25 each, region 0.5.
    Gradient d loss / d logp = -A * rho / 4 on unclipped bits, 0 on clipped ones: (0, -0.25; 0, +0.25)."""
    cfg = GRPOConfig(beta=0.0, epsilon=0.2, vllm_importance_sampling_correction=False)
    logp = torch.log(torch.tensor([[[0.8, 0.5]], [[0.25, 0.5]]], dtype=torch.float64)).requires_grad_(True)
    old = torch.log(torch.full((2, 1, 2), 0.5, dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = grpo.policy_loss(logp, adv, cfg, old_logp=old)
    loss.backward()
    assert loss.item() == pytest.approx(-0.1, abs=1e-12)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.25)
    assert m["clip_ratio/low_mean"] == pytest.approx(0.25)
    assert m["clip_ratio/region_mean"] == pytest.approx(0.5)
    torch.testing.assert_close(logp.grad, torch.tensor([[[0.0, -0.25]], [[0.0, 0.25]]], dtype=torch.float64))
    # the same data with whole-batch counts (one micro-batch, one rank) gives the same value
    loss_b, _ = grpo.policy_loss(logp, adv, cfg, old_logp=old, batch=grpo.batch_counts(torch.ones(2, dtype=torch.bool), 1, 2))
    assert loss_b.item() == pytest.approx(-0.1, abs=1e-12)
    # on-policy (old = None, the first pass): nothing is clipped
    _, m0 = grpo.policy_loss(logp, adv, cfg)
    assert m0["clip_ratio/region_mean"] == 0.0


B, N, L, U, D = 8, 3, 2, 2, 2  # 8 samples (4 groups of 2), 3 AR tokens, 8 bits per token
CASES = [dict(loss_type="grpo"), dict(loss_type="grpo", bsq_loss_normalize=True), dict(loss_type="bnpo"),
         dict(loss_type="dr_grpo"), dict(loss_type="dapo"),
         dict(loss_type="grpo", importance_sampling_level="sequence"), dict(loss_type="dapo", beta=0.0)]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(4, L * U * D * 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=torch.float64))
        head.bias.zero_()
    feats = torch.randn(B, N, 4, generator=g, dtype=torch.float64)
    bits = torch.randint(0, 2, (B, N, L, U, D), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    keep = torch.ones(B, dtype=torch.bool)
    keep[[2, 5]] = False  # excluded samples: masked, and they change bnpo's / dapo's per-micro-batch denominators
    cfg0 = GRPOConfig()
    with torch.no_grad():
        lp = grpo.bit_logprobs(head(feats).view(B, N, L, U, D, 2), bits, cfg0)
        old = lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64)  # off-policy: clipping acts
        ref = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
        roll = old + 0.1 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    return head, feats, bits, adv, keep, old, ref, roll


def _gradient(case, ranks: int, micro: int) -> torch.Tensor:
    """The head's gradient when the batch is split over ``ranks`` ranks, each in micro-batches of ``micro``
    samples, gradients summed over micro-batches and averaged over ranks (as DeepSpeed does)."""
    head, feats, bits, adv, keep, old, ref, roll = _batch()
    cfg = GRPOConfig(**case)
    counts = grpo.batch_counts(keep, N, L * U * D, num_processes=ranks)
    per_rank = B // ranks
    total = torch.zeros_like(head.weight)
    for r in range(ranks):
        head.zero_grad()
        for i in range(r * per_rank, (r + 1) * per_rank, micro):
            s = slice(i, i + micro)
            logp = grpo.bit_logprobs(head(feats[s]).view(-1, N, L, U, D, 2), bits[s], cfg)
            loss, _ = grpo.policy_loss(logp, adv[s], cfg, old_logp=old[s], ref_logp=ref[s], rollout_logp=roll[s],
                                       sample_mask=keep[s], batch=counts)
            loss.backward()
        total += head.weight.grad / ranks
    return total


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradient_does_not_depend_on_micro_batches_or_ranks(case):
    one = _gradient(case, ranks=1, micro=B)
    assert one.abs().max() > 1e-3  # a real gradient
    for ranks, micro in ((1, 2), (2, 2), (2, 4), (1, 3)):  # (1, 3): a short last micro-batch
        torch.testing.assert_close(_gradient(case, ranks, micro), one, rtol=1e-6, atol=1e-9,
                                   msg=f"{case}: {ranks} rank(s) x micro-batches of {micro}")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_one_micro_batch_equals_the_reference_formula(loss_type):
    """One micro-batch on one rank, nothing excluded: the whole-batch counts give TRL's per-micro-batch value (dapo
    with num_items_in_batch = the AR tokens of the batch)."""
    head, feats, bits, adv, _, old, ref, roll = _batch()
    cfg = GRPOConfig(loss_type=loss_type)
    logp = grpo.bit_logprobs(head(feats).view(B, N, L, U, D, 2), bits, cfg)
    keep = torch.ones(B, dtype=torch.bool)
    trl, _ = grpo.policy_loss(logp, adv, cfg, old_logp=old, ref_logp=ref, rollout_logp=roll,
                              num_items_in_batch=float(B * N))
    ours, _ = grpo.policy_loss(logp, adv, cfg, old_logp=old, ref_logp=ref, rollout_logp=roll,
                               batch=grpo.batch_counts(keep, N, L * U * D))
    assert ours.item() == pytest.approx(trl.item(), rel=1e-12)
    assert math.isfinite(ours.item()) and ours.item() != 0.0


def test_per_micro_batch_dapo_would_scale_the_gradient():
    """What the whole-batch counts fix: dapo normalised per micro-batch (num_items_in_batch left to the micro-batch)
    gives (micro-batches per rank) x the gradient of one micro-batch."""
    head, feats, bits, adv, _, old, ref, roll = _batch()
    cfg = GRPOConfig(loss_type="dapo", beta=0.0)

    def grad(micro):
        head.zero_grad()
        for i in range(0, B, micro):
            s = slice(i, i + micro)
            logp = grpo.bit_logprobs(head(feats[s]).view(-1, N, L, U, D, 2), bits[s], cfg)
            grpo.policy_loss(logp, adv[s], cfg, old_logp=old[s], rollout_logp=roll[s])[0].backward()
        return head.weight.grad.clone()

    torch.testing.assert_close(grad(2), 4 * grad(B))


def test_reduce_loss_rejects_both_normalisations():
    x = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match="not both"):
        grpo.reduce_loss(x, x, "dapo", grad_accum=2, batch=grpo.batch_counts(torch.ones(2, dtype=torch.bool), 3, 4))


def test_ref_model_path_needs_a_kl_term():
    from uniar_ray.config import ConfigError

    with pytest.raises(ConfigError, match="ref_model_path"):
        GRPOConfig(beta=0.0, ref_model_path="/ckpt/ref")
    assert GRPOConfig(beta=0.01, ref_model_path="/ckpt/ref").ref_model_path == "/ckpt/ref"
