"""The clipped per-bit GRPO loss (spec §7.7): vectorised vs a slow per-bit loop (value, gradient, clip metrics),
the on-policy first iteration, the reductions and their units, sample masks, truncated importance sampling."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from uniar_ray import grpo
from uniar_ray.config import GRPOConfig

B, N, K = 4, 3, 8  # samples, AR tokens, bits per token
GRAD_ACC = 2


def slow_loss(logp, old, ref, roll, adv, mask, cfg, grad_accum, num_items, num_processes):
    """One Python term per bit, as the reference's formulas read; torch scalars so autograd gives the gradient."""
    eps_lo = cfg.epsilon
    eps_hi = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    Bn, Nn, Kn = logp.shape
    terms = [[None] * (Nn * Kn) for _ in range(Bn)]
    low = high = count = 0.0
    seq_low = seq_high = seq_count = 0.0
    for b in range(Bn):
        bits = [(n, k) for n in range(Nn) for k in range(Kn)]
        if cfg.importance_sampling_level == "sequence":
            num = sum((logp[b, n, k] - old[b, n, k]) * mask[b, n, k] for n, k in bits)
            seq_lw = num / max(float(sum(mask[b, n, k] for n, k in bits)), 1.0)
        for t, (n, k) in enumerate(bits):
            lw = logp[b, n, k] - old[b, n, k] if cfg.importance_sampling_level == "token" else seq_lw
            rho = torch.exp(lw)
            rho_hat = torch.clamp(rho, 1 - eps_lo, 1 + eps_hi)
            if cfg.delta is not None:
                rho = torch.clamp(rho, max=cfg.delta)
            a = float(adv[b])
            term = -torch.min(rho * a, rho_hat * a)
            if roll is not None and cfg.vllm_importance_sampling_correction:
                term = term * min(math.exp(float(old[b, n, k]) - float(roll[b, n, k])),
                                  cfg.vllm_importance_sampling_cap)
            if cfg.beta != 0:
                d = ref[b, n, k] - logp[b, n, k]
                term = term + cfg.beta * (torch.exp(d) - d - 1)
            terms[b][t] = term * mask[b, n, k]
            if cfg.importance_sampling_level == "token":
                m, r = float(mask[b, n, k]), float(rho.detach())
                lo = r < 1 - eps_lo and a < 0
                hi = r > 1 + eps_hi and a > 0
                low, high, count = low + m * lo, high + m * hi, count + m
        if cfg.importance_sampling_level == "sequence" and float(mask[b].sum()) > 0:
            rho = min(math.exp(seq_lw.item()), cfg.delta or math.inf)
            seq_low += rho < 1 - eps_lo and float(adv[b]) < 0
            seq_high += rho > 1 + eps_hi and float(adv[b]) > 0
            seq_count += 1
    sums = [sum(row) for row in terms]
    total = sum(sums)
    if cfg.loss_type == "grpo":
        if cfg.bsq_loss_normalize:
            per = [s / Nn for s in sums]
        else:
            per = [s / max(float(mask[b].sum()), 1.0) for b, s in enumerate(sums)]
        loss = sum(per) / Bn / grad_accum
    elif cfg.loss_type == "bnpo":
        loss = total / max(float(mask.sum()), 1.0) / grad_accum
    elif cfg.loss_type == "dr_grpo":
        loss = total / (Bn * cfg.max_completion_length) / grad_accum
    else:
        loss = total / (num_items / num_processes)
    if cfg.importance_sampling_level == "sequence":
        low, high, count = seq_low, seq_high, seq_count
    return loss, {"clip_ratio/low_mean": low / count, "clip_ratio/high_mean": high / count,
                  "clip_ratio/region_mean": (low + high) / count}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(B, N, K, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    # off-policy, so that clipping happens per bit, and per sample (sequence level): sample 0 (A > 0) has a high
    # ratio, sample 1 (A < 0) a low one
    shift = torch.tensor([-0.4, 0.4, 0.0, 0.0], dtype=torch.float64).view(B, 1, 1)
    old = logp + shift + 0.3 * torch.randn(B, N, K, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, N, K, generator=g, dtype=torch.float64)
    roll = old + 0.5 * torch.randn(B, N, K, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -0.9], dtype=torch.float64)
    mask = (torch.rand(B, N, K, generator=g) > 0.2).double()
    mask[2] = 0.0  # a fully masked (excluded) sample
    return logp, old, ref, roll, adv, mask


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", bsq_loss_normalize=True),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo"),
    dict(loss_type="grpo", epsilon_high=0.28, delta=1.1),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.0),
    dict(loss_type="grpo", vllm_importance_sampling_correction=False, beta=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_policy_loss_matches_slow_loop(case):
    cfg = GRPOConfig(**case)
    logp, old, ref, roll, adv, mask = _inputs()
    num_items, nproc = 40.0, 2
    x = logp.clone().requires_grad_(True)
    loss, metrics = grpo.policy_loss(x, adv, cfg, old_logp=old, ref_logp=ref, rollout_logp=roll, mask=mask,
                                     grad_accum=GRAD_ACC, num_items_in_batch=num_items, num_processes=nproc)
    loss.backward()
    y = logp.clone().requires_grad_(True)
    want, want_metrics = slow_loss(y, old, ref, roll, adv, mask, cfg, GRAD_ACC, num_items, nproc)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["loss"] == pytest.approx(want.item())
    assert metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"] > 0  # the test exercises clipping
    assert ("kl" in metrics) == (cfg.beta != 0)
    assert metrics["sampling/importance_sampling_ratio/max"] <= cfg.vllm_importance_sampling_cap + 1e-12


def test_first_on_policy_iteration_zero_loss_nonzero_gradient():
    """old = logp.detach() and ref == policy: ratio 1, nothing clipped, KL 0, loss -mean(A) = 0, gradient A * dlogp."""
    torch.manual_seed(0)
    G, L, U, D = 4, 2, 2, 4
    head = torch.nn.Linear(5, L * U * D * 2).double()
    feats = torch.randn(2 * G, N, 5, dtype=torch.float64)
    logits = head(feats).view(2 * G, N, L, U, D, 2)
    cfg = GRPOConfig(num_generations=G, temperature=0.8)
    bits = torch.bernoulli(torch.full((2 * G, N, L, U, D), 0.5)).to(torch.uint8)
    logp = grpo.bit_logprobs(logits, bits, cfg)
    rewards = torch.rand(2 * G, 1)
    adv = grpo.group_advantages(rewards, [1.0], G).advantages.double()
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        c = dataclasses.replace(cfg, loss_type=loss_type)
        loss, metrics = grpo.policy_loss(logp, adv, c, ref_logp=logp.detach(), rollout_logp=logp.detach())
        head.zero_grad()
        loss.backward(retain_graph=True)
        assert abs(loss.item()) < 1e-6, loss_type  # float32 advantages: zero-mean up to rounding
        assert head.weight.grad.abs().sum() > 1e-6, loss_type
        assert metrics["clip_ratio/region_mean"] == 0.0 and metrics["kl"] == 0.0
        assert metrics["sampling/importance_sampling_ratio/mean"] == 1.0


def test_reductions_and_their_units():
    """A per-bit loss of exactly 1: grpo -> 1/ga, bsq_loss_normalize and dapo -> K/ga and K (the 1024x quirk at
    K=1024), bnpo -> 1/ga, dr_grpo -> N*K/256/ga."""
    ones = torch.ones(B, N, K)
    m = torch.ones(B, N, K)
    red = grpo.reduce_loss
    assert float(red(ones, m, "grpo", grad_accum=4)) == pytest.approx(1 / 4)
    assert float(red(ones, m, "grpo", bsq_loss_normalize=True, grad_accum=4)) == pytest.approx(K / 4)
    assert float(red(ones, m, "bnpo", grad_accum=4)) == pytest.approx(1 / 4)
    assert float(red(ones, m, "dr_grpo", grad_accum=4)) == pytest.approx(N * K / 256 / 4)
    assert float(red(ones, m, "dapo", grad_accum=4)) == pytest.approx(K)  # no / grad_accum
    # the reference's DAPO normaliser: AR tokens of the generation batch over all processes, / processes
    assert float(red(ones, m, "dapo", num_items_in_batch=8 * B * N, num_processes=2)) == pytest.approx(K / 4)
    # published-model shape: 1024 bits per AR token
    full = torch.ones(1, 2, 4, 4, 64).reshape(1, 2, -1)
    assert float(red(full, torch.ones_like(full), "grpo", bsq_loss_normalize=True)) == pytest.approx(1024)
    with pytest.raises(ValueError, match="loss_type"):
        red(ones, m, "ppo")


def test_sample_mask_excludes_a_sample():
    logp, old, ref, roll, adv, _ = _inputs(1)
    cfg = GRPOConfig()
    keep = torch.tensor([True, True, False, True])
    x = logp.clone().requires_grad_(True)
    loss, _ = grpo.policy_loss(x, adv, cfg, old_logp=old, ref_logp=ref, rollout_logp=roll, sample_mask=keep)
    loss.backward()
    assert (x.grad[2] == 0).all() and (x.grad[0] != 0).any()
    # the same as a per-bit mask that zeroes the sample
    mask = keep.double().view(B, 1, 1).expand(B, N, K)
    loss2, _ = grpo.policy_loss(logp, adv, cfg, old_logp=old, ref_logp=ref, rollout_logp=roll, mask=mask)
    assert loss.item() == pytest.approx(loss2.item())


def test_importance_sampling_weight_is_capped_and_detached():
    logp, _, _, _, adv, _ = _inputs(2)
    roll = logp - 5.0  # the rollout engine thought every bit far less likely: raw weight e^5, capped at 2
    cfg = GRPOConfig(beta=0.0)
    x = logp.clone().requires_grad_(True)
    loss, metrics = grpo.policy_loss(x, adv, cfg, rollout_logp=roll)
    assert metrics["sampling/importance_sampling_ratio/min"] == pytest.approx(2.0)
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(5.0)
    loss.backward()
    x2 = logp.clone().requires_grad_(True)
    plain, _ = grpo.policy_loss(x2, adv, dataclasses.replace(cfg, vllm_importance_sampling_correction=False))
    plain.backward()
    torch.testing.assert_close(x.grad, 2.0 * x2.grad)


def slow_gap(old, roll, mask, cap):
    """The train/rollout gap metrics, one bit at a time."""
    diffs, ratios = [], []
    for b in range(old.shape[0]):
        for t in range(old.shape[1]):
            if float(mask[b, t]) > 0:
                d = float(old[b, t]) - float(roll[b, t])
                diffs.append(abs(d))
                ratios.append(math.exp(d))
    capped = [min(r, cap) for r in ratios]
    return {"sampling/sampling_logp_difference/mean": sum(diffs) / len(diffs),
            "sampling/sampling_logp_difference/max": max(diffs),
            "sampling/importance_sampling_ratio/min": min(capped),
            "sampling/importance_sampling_ratio/mean": sum(capped) / len(capped),
            "sampling/importance_sampling_ratio/max": max(capped),
            "sampling/importance_sampling_capped_frac": sum(r > cap for r in ratios) / len(ratios)}


def test_rollout_gap_matches_slow_loop_with_the_correction_on_or_off():
    logp, old, _, roll, adv, mask = _inputs()
    flat = [x.reshape(B, -1) for x in (old, roll, mask)]
    want = slow_gap(*flat, cap=2.0)
    got = grpo.rollout_gap(*flat, cap=2.0)
    assert got == pytest.approx(want, rel=1e-6)
    assert 0 < got["sampling/importance_sampling_capped_frac"] < 1  # the case exercises the cap
    for on in (True, False):  # measured every step; only applied with the correction on
        cfg = GRPOConfig(beta=0.0, vllm_importance_sampling_correction=on)
        _, metrics = grpo.policy_loss(logp, adv, cfg, old_logp=old, rollout_logp=roll, mask=mask)
        assert {k: metrics[k] for k in want} == pytest.approx(want, rel=1e-6)
    # on-policy first iteration (no old log-probs): the gap is between the trainer's current log-probs and the engine's
    _, metrics = grpo.policy_loss(logp, adv, GRPOConfig(beta=0.0), rollout_logp=roll, mask=mask)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(
        slow_gap(logp.reshape(B, -1), *flat[1:], cap=2.0)["sampling/sampling_logp_difference/max"])
    nothing = grpo.rollout_gap(*flat[:2], torch.zeros_like(flat[2]), cap=2.0)
    assert all(math.isnan(v) for v in nothing.values())


def test_merge_metrics_takes_the_max_of_maxima_and_the_mean_of_means():
    from uniar_ray.train_step import merge_metrics

    rows = [{"a/max": 1.0, "a/min": 3.0, "a/mean": math.nan, "b_frac": 0.5, "loss": 1.0},
            {"a/max": 2.0, "a/min": math.nan, "a/mean": 4.0, "b_frac": 0.1, "loss": math.nan}, {"grad_norm": 2.0}]
    m = merge_metrics(rows)
    assert (m["a/max"], m["a/min"], m["a/mean"], m["grad_norm"]) == (2.0, 3.0, 4.0, 2.0)
    assert m["b_frac"] == pytest.approx(0.3) and math.isnan(m["loss"])  # a NaN loss is never hidden


def test_policy_loss_input_errors():
    logp, _, _, _, adv, _ = _inputs()
    with pytest.raises(ValueError, match=r"\[B, N, L, U, D\]"):
        grpo.policy_loss(logp.flatten(1), adv, GRPOConfig(beta=0.0))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.policy_loss(logp, adv, GRPOConfig(beta=0.01))
    with pytest.raises(ValueError, match="advantages"):
        grpo.policy_loss(logp, adv[:2], GRPOConfig(beta=0.0))


def test_entropy_mean_metric():
    e = torch.arange(8, dtype=torch.float32).view(2, 2, 2)
    assert grpo.entropy_mean(e) == pytest.approx(3.5)
    assert grpo.entropy_mean(e, torch.tensor([False, True])) == pytest.approx(5.5)
