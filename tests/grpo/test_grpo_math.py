"""GRPO advantages, per-bit log-probs, entropy and k3 KL against slow, obvious Python loops (spec §7.5-7.7)."""
from __future__ import annotations

import itertools
import logging
import math
import statistics

import pytest
import torch

from uniar_ray import grpo
from uniar_ray.config import GRPOConfig

NAN = float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


def slow_advantages(rows, weights, G, scale, all_nan, exclude=None):
    """The formula written out: per row a weighted sum of the non-NaN rewards; per group mean and (n-1) std over
    the rows that count; A = (r - mean) / (std + 1e-4)."""
    B = len(rows)
    exclude = exclude or [False] * B
    r, no_reward, out = [], [], []
    for row in rows:
        vals = [w * x for w, x in zip(weights, row) if not math.isnan(x)]
        no_reward.append(not vals)
        r.append(sum(vals))
    keep = [not exclude[i] and not (all_nan == "exclude" and no_reward[i]) for i in range(B)]
    kept_all = [r[i] for i in range(B) if keep[i]]
    batch_std = statistics.stdev(kept_all) if len(kept_all) >= 2 else 0.0
    for g in range(B // G):
        idx = [i for i in range(g * G, (g + 1) * G) if keep[i]]
        vals = [r[i] for i in idx]
        mean = sum(vals) / len(vals) if vals else 0.0
        std = statistics.stdev(vals) if len(vals) >= 2 else 0.0
        for i in range(g * G, (g + 1) * G):
            if not keep[i]:
                out.append(0.0)
                continue
            a = r[i] - mean
            if scale == "group":
                a /= std + 1e-4
            elif scale == "batch":
                a /= batch_std + 1e-4
            out.append(a)
    return out, keep, no_reward


REWARDS = [  # 3 groups of 4, 3 functions; NaN = not applicable
    [0.5, NAN, 0.1],
    [0.7, NAN, 0.3],
    [0.2, NAN, NAN],
    [0.9, NAN, 0.0],
    [NAN, 1.0, 0.4],
    [NAN, NAN, NAN],  # no reward applies
    [NAN, 0.0, 0.2],
    [NAN, 0.5, 0.2],
    [0.3, NAN, 0.3],  # this group: all rows score the same -> zero std
    [0.3, NAN, 0.3],
    [0.3, NAN, 0.3],
    [0.3, NAN, 0.3],
]
WEIGHTS = [1.0, 2.0, 0.5]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("all_nan", ["exclude", "zero"])
def test_advantages_match_loop(scale, all_nan):
    R = torch.tensor(REWARDS)
    exclude = [False] * 12
    exclude[1] = True  # e.g. a failed decode, excluded in both modes
    want, keep, no_reward = slow_advantages(REWARDS, WEIGHTS, 4, scale, all_nan, exclude)
    out = grpo.group_advantages(R, WEIGHTS, 4, scale, all_nan, exclude=torch.tensor(exclude))
    torch.testing.assert_close(out.advantages, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert out.excluded.tolist() == [not k for k in keep]
    assert out.no_reward.tolist() == no_reward
    assert torch.isnan(out.rewards[out.excluded]).all() and not torch.isnan(out.rewards[~out.excluded]).any()
    for g in range(3):  # advantages of the kept rows of a group sum to zero
        assert abs(float(out.advantages[g * 4:(g + 1) * 4].sum())) < 1e-4


def test_zero_mode_reproduces_the_reference_formula():
    """all_nan_rewards=zero and no exclusions: exactly the reference's tensor expression (spec §7.4.5, §7.5)."""
    R = torch.tensor(REWARDS)
    r = (R * torch.tensor(WEIGHTS)).nansum(dim=1)
    mean = r.view(-1, 4).mean(dim=1).repeat_interleave(4)
    std = r.view(-1, 4).std(dim=1).repeat_interleave(4)
    out = grpo.group_advantages(R, WEIGHTS, 4, "group", "zero")
    torch.testing.assert_close(out.advantages, (r - mean) / (std + 1e-4))
    assert out.rewards[5] == 0.0 and not out.excluded.any()
    batch = grpo.group_advantages(R, WEIGHTS, 4, "batch", "zero")
    torch.testing.assert_close(batch.advantages, (r - mean) / (r.std() + 1e-4))
    none = grpo.group_advantages(R, WEIGHTS, 4, "none", "zero")
    torch.testing.assert_close(none.advantages, r - mean)
    # True/False are the reference's spellings of group/none
    torch.testing.assert_close(grpo.group_advantages(R, WEIGHTS, 4, True, "zero").advantages, out.advantages)
    torch.testing.assert_close(grpo.group_advantages(R, WEIGHTS, 4, False, "zero").advantages, none.advantages)


def test_all_nan_row_zero_mode_warns_and_exclude_mode_reports(caplog):
    R = torch.tensor(REWARDS)
    with caplog.at_level(logging.WARNING, logger="uniar_ray.grpo"):
        zero = grpo.group_advantages(R, WEIGHTS, 4, "group", "zero")
    assert "rows [5]" in caplog.text and zero.no_reward.tolist()[5]
    assert zero.advantages[5] != 0  # the reference trains on a made-up 0 reward
    excl = grpo.group_advantages(R, WEIGHTS, 4, "group", "exclude")
    assert excl.excluded.nonzero().flatten().tolist() == [5]
    assert excl.advantages[5] == 0 and math.isnan(float(excl.rewards[5]))
    # group 1 statistics use rows 4, 6, 7 only
    r = [2.0 + 0.2, 0.0 + 0.1, 1.0 + 0.1]
    m, s = sum(r) / 3, statistics.stdev(r)
    torch.testing.assert_close(excl.advantages[[4, 6, 7]], torch.tensor([(x - m) / (s + 1e-4) for x in r]))
    assert excl.metrics["frac_no_reward"] == pytest.approx(1 / 12)
    assert excl.metrics["num_excluded"] == 1.0


def test_groups_with_fewer_than_two_rows_and_fully_excluded_groups():
    R = torch.tensor([[NAN], [NAN], [1.0], [NAN], [0.5], [0.7]])
    out = grpo.group_advantages(R, [1.0], 2, "group", "exclude")
    assert out.advantages.tolist()[:4] == [0.0, 0.0, 0.0, 0.0]  # empty group, single-row group
    assert out.excluded.tolist() == [True, True, False, True, False, False]
    # groups seen: 2 (one with a single row = zero std, one with std > 0)
    assert out.metrics["frac_reward_zero_std"] == pytest.approx(0.5)
    all_out = grpo.group_advantages(torch.full((4, 2), NAN), [1.0, 1.0], 2)
    assert all_out.excluded.all() and (all_out.advantages == 0).all() and math.isnan(all_out.metrics["reward"])


def test_advantage_metrics():
    R = torch.tensor(REWARDS)
    out = grpo.group_advantages(R, WEIGHTS, 4, "group", "exclude", func_names=["a", "b", "c"])
    m = out.metrics
    for i, name in enumerate("abc"):
        col = [row[i] for row in REWARDS if not math.isnan(row[i])]
        assert m[f"rewards/{name}/mean"] == pytest.approx(statistics.fmean(col))
        assert m[f"rewards/{name}/std"] == pytest.approx(statistics.stdev(col), rel=1e-5)
    kept = [float(x) for x in out.rewards if not math.isnan(float(x))]
    assert m["reward"] == pytest.approx(statistics.fmean(kept), rel=1e-6)
    assert m["frac_reward_zero_std"] == pytest.approx(1 / 3)  # the third group
    want_std = []
    for g in range(3):
        vals = [float(out.rewards[i]) for i in range(g * 4, g * 4 + 4) if not out.excluded[i]]
        want_std += [statistics.stdev(vals)] * len(vals)
    assert m["reward_std"] == pytest.approx(statistics.fmean(want_std), rel=1e-5)


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        grpo.group_advantages(torch.zeros(6, 1), [1.0], 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages(torch.zeros(4, 1), [1.0], 2, "sometimes")
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        grpo.group_advantages(torch.zeros(4, 1), [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="all_nan_rewards"):
        grpo.group_advantages(torch.zeros(4, 1), [1.0], 2, all_nan_rewards="skip")


def test_whole_groups():
    m = torch.tensor([False, False, True, False, False, False])
    assert grpo.whole_groups(m, 2).tolist() == [False, False, True, True, False, False]


# ----------------------------------------------------------------------------------------------------------------
# Per-bit log-probs, entropy, k3 KL
# ----------------------------------------------------------------------------------------------------------------


def _logits_and_bits(B=2, N=3, L=2, U=2, D=3, extra=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N + extra, L, U, D, 2, generator=g, dtype=torch.float64) * 2
    bits = torch.randint(0, 2, (B, N, L, U, D), generator=g, dtype=torch.uint8)
    return logits, bits


@pytest.mark.parametrize("use_temp", [True, False])
@pytest.mark.parametrize("extra", [0, 2])
def test_bit_logprobs_and_entropy_match_loop(use_temp, extra):
    cfg = GRPOConfig(temperature=0.7, logits_use_temperature=use_temp)
    logits, bits = _logits_and_bits(extra=extra)
    logp = grpo.bit_logprobs(logits, bits, cfg)
    ent = grpo.bit_entropy(logits, cfg, n_tokens=bits.shape[1])
    assert logp.shape == bits.shape == ent.shape and logp.dtype == torch.float32  # loss_use_float
    T = 0.7 if use_temp else 1.0
    for idx in itertools.product(*(range(s) for s in bits.shape)):
        b, n = idx[0], idx[1]
        pos = (b, n + extra, *idx[2:])  # the last N positions of the logits
        x0, x1 = float(logits[pos][0]) / T, float(logits[pos][1]) / T
        lse = math.log(math.exp(x0) + math.exp(x1))
        want = (x1 if bits[idx] else x0) - lse
        assert float(logp[idx]) == pytest.approx(want, abs=1e-5)
        p0, p1 = math.exp(x0 - lse), math.exp(x1 - lse)
        assert float(ent[idx]) == pytest.approx(-(p0 * math.log(p0) + p1 * math.log(p1)), abs=1e-5)


def test_bit_logprobs_precision_flags_and_shapes():
    logits, bits = _logits_and_bits()
    half = grpo.bit_logprobs(logits.bfloat16(), bits, GRPOConfig(loss_use_float=False))
    assert half.dtype == torch.bfloat16
    assert grpo.bit_logprobs(logits.bfloat16(), bits, GRPOConfig()).dtype == torch.float32
    zero = torch.zeros(1, 2, 1, 1, 4, 2)
    assert torch.allclose(grpo.bit_entropy(zero, GRPOConfig()), torch.tensor(math.log(2)))
    with pytest.raises(ValueError, match="do not match bits"):
        grpo.bit_logprobs(logits, bits[:, :, :1], GRPOConfig())
    with pytest.raises(ValueError, match="fewer than"):
        grpo.bit_logprobs(logits[:, :1], bits, GRPOConfig())
    # gradient flows to the logits
    x = logits.clone().requires_grad_(True)
    grpo.bit_logprobs(x, bits, GRPOConfig()).sum().backward()
    assert x.grad.abs().sum() > 0


def test_k3_kl_nonnegative_zero_on_equal_and_matches_loop():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, generator=g) - 1, torch.randn(50, generator=g) - 1
    kl = grpo.k3_kl(a, b)
    assert (kl >= 0).all()
    assert torch.equal(grpo.k3_kl(a, a), torch.zeros_like(a))
    for i in range(50):
        d = float(b[i]) - float(a[i])
        assert float(kl[i]) == pytest.approx(math.exp(d) - d - 1, rel=1e-5, abs=1e-6)


def test_truncated_is_ratio():
    old = torch.tensor([-0.1, -2.0, -0.5])
    roll = torch.tensor([-0.1, -0.1, -3.0])
    r = grpo.truncated_is_ratio(old, roll, cap=2.0)
    torch.testing.assert_close(r, torch.tensor([1.0, math.exp(-1.9), 2.0]))
