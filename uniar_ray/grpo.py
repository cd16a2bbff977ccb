"""GRPO on bitwise visual tokens (spec §7.5-7.7): group advantages, per-bit log-probs and entropy, the clipped loss.

Pure PyTorch functions, no Ray, no model: the trainer actor calls ``bit_logprobs`` / ``bit_entropy`` on the logits of
``bit_logits`` and ``policy_loss`` on the result; the driver calls ``group_advantages`` on the rewards.

Shapes: B samples, G = num_generations (a group is G consecutive samples), F reward functions, N AR tokens per image,
L levels x U sub-patches x D bits per token (K = L*U*D bits per AR token, 1024 for the published model). Every
"token" of the loss is one bit, so a 512x512 sample has N*K = 262,144 of them.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Sequence

import torch

from uniar_ray.config import GRPOConfig

logger = logging.getLogger(__name__)

SCALE_REWARDS = ("group", "batch", "none")
ALL_NAN_REWARDS = ("exclude", "zero")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # the reference's advantage denominator: std + 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Advantages (spec §7.5)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GroupAdvantages:
    """What ``group_advantages`` returns; every tensor is [B], in the order of the input rows."""

    advantages: torch.Tensor  # [B] float32; 0.0 on excluded rows
    rewards: torch.Tensor  # [B] float32 weighted nansum over functions; NaN on excluded rows
    excluded: torch.Tensor  # [B] bool: left out of the statistics; the caller leaves them out of the loss
    no_reward: torch.Tensor  # [B] bool: every reward function returned NaN (not applicable) for this row
    metrics: dict[str, float]


def group_advantages(
    rewards_per_func: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    num_generations: int,
    scale_rewards: str | bool = "group",
    all_nan_rewards: str = "exclude",
    exclude: torch.Tensor | None = None,
    func_names: Sequence[str] | None = None,
) -> GroupAdvantages:
    """Group-relative advantages A = r - mean_group(r), optionally divided by (std + 1e-4).

    rewards_per_func: [B, F], NaN where a function does not apply to a row. weights: [F]. B must be a multiple of
    ``num_generations``; rows g*G .. g*G+G-1 are the G samples of prompt g.

    r = nansum_f(w_f * R_f) [B]. scale_rewards: "group" (or True) divides by the unbiased (n-1) std of the row's
    group, "batch" by the unbiased std of all rows, "none" (or False) does not divide.

    Rows where every function is NaN have no applicable reward. ``all_nan_rewards``:
    - "exclude" (default): such rows are reported in ``no_reward``, marked ``excluded`` and left out of the group
      statistics (mean, std and the batch std are over the remaining rows); their advantage is 0 and their reward
      NaN. The caller must also leave them out of the loss (``policy_loss(sample_mask=~excluded)``).
    - "zero": the reference's behaviour (spec §7.4.5): nansum of an all-NaN row is 0, that 0 is a real reward in
      the statistics and the loss, and a warning is logged.
    ``exclude`` [B] bool marks rows the caller already gave up on (a failed decode or reward call); they are
    excluded in both modes. A group with fewer than two included rows has std 0, hence zero advantages.

    metrics: ``rewards/<name>/mean|std`` (nanmean / unbiased nanstd of each function over the rows not excluded by
    the caller), ``reward`` and ``reward_std`` (mean over included rows of r and of the std used for scaling, as
    the reference logs them), ``frac_reward_zero_std`` (fraction of groups with an included row whose group std is
    0: no learning signal; in "batch" mode too, where the reference logs the global std instead), ``frac_no_reward``
    and ``num_excluded``.
    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [B, F], got shape {tuple(rewards_per_func.shape)}")
    B, F = rewards_per_func.shape
    G = int(num_generations)
    if G < 1 or B % G:
        raise ValueError(f"{B} rows do not split into groups of num_generations={G}")
    scale = {True: "group", False: "none"}[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    if all_nan_rewards not in ALL_NAN_REWARDS:
        raise ValueError(f"all_nan_rewards={all_nan_rewards!r}: expected one of {', '.join(ALL_NAN_REWARDS)}")
    R = rewards_per_func.float()
    w = torch.as_tensor(weights, dtype=torch.float32, device=R.device).reshape(-1)
    if w.numel() != F:
        raise ValueError(f"{w.numel()} reward weights for {F} reward functions")
    names = list(func_names) if func_names is not None else [f"func{i}" for i in range(F)]
    if len(names) != F:
        raise ValueError(f"{len(names)} function names for {F} reward functions")
    caller_excluded = torch.zeros(B, dtype=torch.bool, device=R.device) if exclude is None \
        else exclude.to(device=R.device, dtype=torch.bool).reshape(B)

    no_reward = torch.isnan(R).all(dim=1)
    rewards = (R * w).nansum(dim=1)  # an all-NaN row sums to 0.0
    if all_nan_rewards == "zero":
        if bool((no_reward & ~caller_excluded).any()):
            rows = torch.nonzero(no_reward & ~caller_excluded).flatten().tolist()
            logger.warning("all reward functions returned None for rows %s; they score 0 (all_nan_rewards=zero, "
                           "the reference's behaviour)", rows)
        excluded = caller_excluded
    else:
        excluded = caller_excluded | no_reward
    keep = ~excluded

    # Masked group statistics, vectorised over groups: n = included rows per group, unbiased std when n >= 2.
    rg, kg = rewards.view(-1, G), keep.view(-1, G).float()
    n = kg.sum(dim=1)
    mean_g = (rg * kg).sum(dim=1) / n.clamp(min=1)
    dev = (rg - mean_g[:, None]) * kg
    std_g = torch.where(n >= 2, ((dev * dev).sum(dim=1) / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    advantages = (rg - mean_g[:, None]).reshape(B)
    if scale == "batch":
        std_rows = _masked_std(rewards, keep).expand(B)
    else:  # "group", and "none" (where the std is still logged)
        std_rows = std_g.repeat_interleave(G)
    if scale != "none":
        advantages = advantages / (std_rows + STD_EPS)
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    rewards = torch.where(keep, rewards, torch.full_like(rewards, float("nan")))

    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        col = R[~caller_excluded, i]
        metrics[f"rewards/{name}/mean"] = _nanmean(col)
        metrics[f"rewards/{name}/std"] = _nanstd(col)
    n_keep = int(keep.sum())
    metrics["reward"] = float(rewards[keep].mean()) if n_keep else float("nan")
    metrics["reward_std"] = float(std_rows[keep].mean()) if n_keep else float("nan")
    groups_seen = n > 0
    zero_std = torch.isclose(std_g, torch.zeros_like(std_g)) & groups_seen
    metrics["frac_reward_zero_std"] = float(zero_std.sum() / groups_seen.sum()) if bool(groups_seen.any()) \
        else float("nan")
    metrics["frac_no_reward"] = float((no_reward & ~caller_excluded).float().mean())
    metrics["num_excluded"] = float(excluded.sum())
    return GroupAdvantages(advantages, rewards, excluded, no_reward, metrics)


def whole_groups(mask: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[B] bool -> [B] bool: True for every row of a group in which any row is True (to drop whole groups)."""
    return mask.view(-1, num_generations).any(dim=1).repeat_interleave(num_generations)


def _masked_std(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Unbiased std of x[keep] as a 0-d tensor; 0 when fewer than two rows are kept."""
    v = x[keep]
    return v.std() if v.numel() >= 2 else torch.zeros((), dtype=x.dtype, device=x.device)


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x)) if bool((~torch.isnan(x)).any()) else float("nan")


def _nanstd(x: torch.Tensor) -> float:
    v = x[~torch.isnan(x)]
    return float(v.std()) if v.numel() >= 2 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Per-bit log-probabilities and entropy (spec §7.6)
# ----------------------------------------------------------------------------------------------------------------


def scaled_logits(logits: torch.Tensor, n_tokens: int, cfg: GRPOConfig) -> torch.Tensor:
    """The trainer's post-processing of ``bit_logits``: [B, >=N, L, U, D, 2] -> [B, N, L, U, D, 2].

    ``loss_use_float`` casts to fp32; the last ``n_tokens`` positions along dim 1 are kept; ``logits_use_temperature``
    divides by ``temperature`` (so the log-probs are those of the distribution the rollout sampled from)."""
    if logits.dim() < 3 or logits.shape[-1] != 2:
        raise ValueError(f"bit logits must be [B, N, ..., 2], got shape {tuple(logits.shape)}")
    if logits.shape[1] < n_tokens:
        raise ValueError(f"logits hold {logits.shape[1]} positions, fewer than the {n_tokens} AR tokens")
    if cfg.loss_use_float:
        logits = logits.float()
    logits = logits[:, logits.shape[1] - n_tokens:]
    if cfg.logits_use_temperature:
        logits = logits / cfg.temperature
    return logits


def bit_logprobs(logits: torch.Tensor, bits: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """log p(sampled bit) per bit: logits [B, >=N, L, U, D, 2], bits [B, N, L, U, D] (0/1) -> [B, N, L, U, D].

    Equal to logit_b - logsumexp(logits) over the two-way axis, after ``scaled_logits``. Differentiable."""
    x = scaled_logits(logits, bits.shape[1], cfg)
    if x.shape[:-1] != bits.shape:
        raise ValueError(f"logits {tuple(x.shape)} do not match bits {tuple(bits.shape)} (+ a trailing 2)")
    return torch.log_softmax(x, dim=-1).gather(-1, bits.long().unsqueeze(-1)).squeeze(-1)


def bit_entropy(logits: torch.Tensor, cfg: GRPOConfig, n_tokens: int | None = None) -> torch.Tensor:
    """Entropy in nats of every bit's two-way distribution: [B, >=N, L, U, D, 2] -> [B, N, L, U, D].

    One vectorised expression (the reference loops over chunks of 128 rows, spec §10.24); same post-processing as
    ``bit_logprobs``. A metric: call it under ``torch.no_grad()``."""
    x = scaled_logits(logits, logits.shape[1] if n_tokens is None else n_tokens, cfg)
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Loss (spec §7.7)
# ----------------------------------------------------------------------------------------------------------------


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per bit: exp(d) - d - 1 with d = ref_logp - logp; >= 0, and 0
    exactly where the two agree. Any shape; gradient flows through ``logp`` only if ``ref_logp`` is detached."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log of the importance ratio: "token" -> logp - old_logp per bit, [B, T]; "sequence" -> its masked mean per
    sample, [B, 1] (one ratio per image, GSPO). logp, old_logp, mask: [B, T]."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level={level!r}: expected token or sequence")


def truncated_is_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weight per bit, min(exp(old_logp - rollout_logp), cap) (TRL's
    ``vllm_importance_sampling_correction``): corrects for the rollout engine sampling from a slightly different
    distribution than the trainer scores (other kernels, bf16, a one-step-stale policy). No gradient."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def rollout_gap(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
                ) -> dict[str, float]:
    """How far the rollout engine's sampling log-probs are from the trainer's, over the bits that count (mask > 0).

    old_logp: the trainer's per-bit log-probs of the sampled bits before any update of this batch (the first
    iteration's), rollout_logp: the engine's, mask: [B, T] each. Metrics (NaN when no bit counts):
    - sampling/sampling_logp_difference/mean|max: |old_logp - rollout_logp| per bit, in nats;
    - sampling/importance_sampling_ratio/min|mean|max: the truncated weight min(exp(old - rollout), cap) that the
      correction multiplies each bit's loss by (or would, with it off);
    - sampling/importance_sampling_capped_frac: the fraction of bits whose weight the cap truncated.
    TRL's names (``vllm_importance_sampling_correction``), plus the capped fraction."""
    with torch.no_grad():
        sel = mask > 0
        diff = (old_logp - rollout_logp)[sel]
        ratio = torch.exp(diff)
        out = _stats("sampling/sampling_logp_difference", diff.abs(), ("mean", "max"))
        out.update(_stats("sampling/importance_sampling_ratio", ratio.clamp(max=cap), ("min", "mean", "max")))
        out["sampling/importance_sampling_capped_frac"] = float((ratio > cap).float().mean()) if diff.numel() \
            else float("nan")
    return out


@dataclasses.dataclass(frozen=True)
class BatchCounts:
    """Denominators of the loss over a whole generation batch: every micro-batch on every rank (the driver counts
    them once, every rank gets the same). With them each loss type is normalised once per generation batch, so
    the gradient does not depend on how the batch is cut into micro-batches and ranks (see ``reduce_loss``)."""

    num_samples: int  # samples of the generation batch, excluded ones included (grpo's mean over samples)
    num_bits: float  # bits that count (mask > 0) over the batch: bnpo's denominator
    num_tokens: float  # AR tokens of the samples that count: dapo's, TRL's num_items_in_batch
    num_processes: int = 1  # ranks whose gradients are averaged (DeepSpeed divides their sum by this)


def batch_counts(sample_mask: torch.Tensor, n_tokens: int, bits_per_token: int, num_processes: int = 1) -> BatchCounts:
    """``BatchCounts`` of a generation batch whose samples all have ``n_tokens`` AR tokens of ``bits_per_token``
    bits; sample_mask: [B] bool over the whole batch (all ranks), False = excluded (masked in the loss)."""
    active = int(sample_mask.sum())
    return BatchCounts(num_samples=int(sample_mask.numel()), num_bits=float(active * n_tokens * bits_per_token),
                       num_tokens=float(active * n_tokens), num_processes=int(num_processes))


def reduce_loss(
    per_bit_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    bsq_loss_normalize: bool = False,
    grad_accum: int = 1,
    max_completion_length: int = 256,
    num_items_in_batch: float | None = None,
    num_processes: int = 1,
    batch: BatchCounts | None = None,
) -> torch.Tensor:
    """Reduce per-bit losses [B, N, K] (K bits per AR token) with mask [B, N, K] to a scalar, as the reference does.

    Without ``batch``, TRL's per-micro-batch formulas (the micro-batch is one of ``grad_accum``):
    - "grpo": per-sample mean over bits (masked), mean over samples, / grad_accum. With ``bsq_loss_normalize``
      the per-sample *sum* over bits is divided by N (AR tokens) instead: K x larger (1024x for the published
      model) - the reference's unit quirk, reproduced.
    - "bnpo": sum / number of unmasked bits in the micro-batch, / grad_accum.
    - "dr_grpo": sum / (B * max_completion_length), / grad_accum. 256 is a text-completion length, unrelated to
      images (kept for parity; the units are meaningless here).
    - "dapo": sum / (num_items_in_batch / num_processes), *not* / grad_accum. num_items_in_batch counts AR tokens
      of the whole generation batch over all processes while the sum runs over bits: K x the "grpo" scale, as in
      the reference. None -> B*N (this micro-batch alone is the batch).
    A fully masked sample contributes 0 and still counts in "grpo"'s mean over samples (TRL semantics).

    With ``batch`` (what the trainer uses) the same numerators are divided by whole-generation-batch counts,
    times ``batch.num_processes`` because the ranks' gradients are averaged: grpo / num_samples, bnpo /
    num_bits, dr_grpo / (num_samples * max_completion_length), dapo / num_tokens. The micro-batches' and ranks'
    gradients then add up to the loss of the whole batch. With equal micro-batches and nothing masked that is
    exactly TRL's value per micro-batch; with a short last micro-batch or excluded samples TRL's per-micro-batch
    denominators would weigh bits unequally, these do not. ``grad_accum``, ``num_items_in_batch`` and
    ``num_processes`` must then be left at their defaults.
    """
    B, N = per_bit_loss.shape[:2]
    masked = per_bit_loss * mask
    if batch is not None:
        if grad_accum != 1 or num_items_in_batch is not None or num_processes != 1:
            raise ValueError("reduce_loss: pass either batch= (whole-batch counts) or grad_accum/num_items_in_batch/"
                             "num_processes (per-micro-batch formulas), not both")
        return _reduce_over_batch(masked, mask, loss_type, bsq_loss_normalize, max_completion_length, batch)
    if loss_type == "grpo":
        per_sample = masked.flatten(1).sum(-1)
        denom = float(N) if bsq_loss_normalize else mask.flatten(1).sum(-1).clamp(min=1.0)
        return (per_sample / denom).mean() / grad_accum
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / grad_accum
    if loss_type == "dr_grpo":
        return masked.sum() / (B * max_completion_length) / grad_accum
    if loss_type == "dapo":
        items = float(B * N) if num_items_in_batch is None else float(num_items_in_batch)
        return masked.sum() / (items / num_processes)
    raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def _reduce_over_batch(masked, mask, loss_type, bsq_loss_normalize, max_completion_length, batch: BatchCounts):
    """``reduce_loss`` with whole-generation-batch denominators (masked = per-bit loss * mask, [B, N, K])."""
    w = float(batch.num_processes)
    if loss_type == "grpo":
        per_sample = masked.flatten(1).sum(-1)
        denom = float(masked.shape[1]) if bsq_loss_normalize else mask.flatten(1).sum(-1).clamp(min=1.0)
        return (per_sample / denom).sum() * w / max(batch.num_samples, 1)
    if loss_type == "bnpo":
        return masked.sum() * w / max(batch.num_bits, 1.0)
    if loss_type == "dr_grpo":
        return masked.sum() * w / (max(batch.num_samples, 1) * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() * w / max(batch.num_tokens, 1.0)
    raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: GRPOConfig,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sample_mask: torch.Tensor | None = None,
    grad_accum: int = 1,
    num_items_in_batch: float | None = None,
    num_processes: int = 1,
    batch: BatchCounts | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped per-bit GRPO loss of one micro-batch, and its metrics.

    logp: [B, N, L, U, D] (or [B, N, K]) per-bit log-probs under the policy being trained, with gradient.
    advantages: [B]. old_logp: same shape, the policy that produced the samples as scored by the trainer before
    the first update of this generation batch (needed with num_iterations > 1, where the later passes are
    off-policy and the clipping acts); None -> logp.detach() (on-policy: ratio exactly 1, so at the first
    iteration the loss is -mean(A) = 0 with a non-zero gradient). ref_logp: same shape, the frozen reference (needed when beta != 0). rollout_logp: same shape, the
    rollout engine's sampling log-probs; with ``vllm_importance_sampling_correction`` the per-bit loss is multiplied
    by ``truncated_is_ratio(old_logp, rollout_logp, vllm_importance_sampling_cap)``. They must be of the same
    distribution (same temperature; CFG scale 1 at rollout), otherwise turn the correction off.
    mask: bits that count, [B, N, ...] (default all). sample_mask: [B] bool, False = the sample is left out
    (excluded rows of ``group_advantages``): its bits are masked. batch: whole-generation-batch denominators
    (``reduce_loss``); without it grad_accum / num_items_in_batch / num_processes give TRL's per-micro-batch ones.

    Per bit: rho = exp(log importance weight) (token or sequence level), rho_hat = clamp(rho, 1 - epsilon,
    1 + epsilon_high); with ``delta`` rho is also clamped from above at delta; l = -min(rho*A, rho_hat*A),
    times the IS weight, + beta * k3_kl(logp, ref_logp). Then ``reduce_loss``.

    Metrics (floats): loss; kl (masked mean, when beta != 0); clip_ratio/low_mean (rho < 1 - eps and A < 0),
    clip_ratio/high_mean (rho > 1 + eps_high and A > 0), clip_ratio/region_mean (either); with a rollout_logp,
    whether the correction is on or off, the train/rollout gap of ``rollout_gap`` (``sampling/*``).
    """
    if logp.dim() < 3:
        raise ValueError(f"logp must be [B, N, L, U, D] or [B, N, K] (N AR tokens, K bits each), got "
                         f"{tuple(logp.shape)}: the bsq_loss_normalize and dapo reductions need N")
    B, N = logp.shape[:2]
    shape3 = (B, N, -1)
    lp = logp.reshape(shape3)
    m = torch.ones_like(lp) if mask is None else mask.to(device=lp.device, dtype=lp.dtype).reshape(shape3).expand_as(lp)
    if sample_mask is not None:
        m = m * sample_mask.to(device=lp.device, dtype=lp.dtype).reshape(B, 1, 1)
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be [B]=[{B}], got {tuple(advantages.shape)}")
    old = lp.detach() if old_logp is None else old_logp.reshape(shape3).to(device=lp.device, dtype=lp.dtype)
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    flat_m = m.reshape(B, -1)
    log_w = importance_weights(lp.reshape(B, -1), old.reshape(B, -1), flat_m, cfg.importance_sampling_level)
    coef_1 = torch.exp(log_w)  # [B, T] or [B, 1]
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if cfg.delta is not None:
        coef_1 = torch.clamp(coef_1, max=cfg.delta)
    adv = advantages.to(device=lp.device, dtype=lp.dtype).unsqueeze(1)
    per_bit = -torch.min(coef_1 * adv, coef_2 * adv)
    if per_bit.shape[1] == 1:
        per_bit = per_bit.expand(B, flat_m.shape[1])

    metrics: dict[str, float] = {}
    if rollout_logp is not None:  # measured every step; applied only with the correction on
        roll = rollout_logp.reshape(B, -1).to(device=lp.device, dtype=lp.dtype)
        metrics.update(rollout_gap(old.reshape(B, -1), roll, flat_m, cfg.vllm_importance_sampling_cap))
        if cfg.vllm_importance_sampling_correction:
            per_bit = per_bit * truncated_is_ratio(old.reshape(B, -1), roll, cfg.vllm_importance_sampling_cap)
    if cfg.beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp (the frozen reference policy's per-bit log-probs)")
        kl = k3_kl(lp.reshape(B, -1), ref_logp.reshape(B, -1).to(device=lp.device, dtype=lp.dtype))
        per_bit = per_bit + cfg.beta * kl
        with torch.no_grad():
            metrics["kl"] = float(_masked_mean(kl, flat_m))

    loss = reduce_loss(per_bit.reshape(B, N, -1), m, cfg.loss_type, cfg.bsq_loss_normalize, grad_accum,
                       cfg.max_completion_length, num_items_in_batch, num_processes, batch)

    with torch.no_grad():
        low = (coef_1 < 1 - eps_low) & (adv < 0)
        high = (coef_1 > 1 + eps_high) & (adv > 0)
        if coef_1.shape[1] == 1:  # sequence level: one ratio per sample, averaged over the samples that count
            w = (flat_m.sum(-1, keepdim=True) > 0).to(lp.dtype)
        else:
            w = flat_m
        metrics["clip_ratio/low_mean"] = float(_masked_mean(low.to(lp.dtype), w))
        metrics["clip_ratio/high_mean"] = float(_masked_mean(high.to(lp.dtype), w))
        metrics["clip_ratio/region_mean"] = float(_masked_mean((low | high).to(lp.dtype), w))
        metrics["loss"] = float(loss.detach())
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _stats(prefix: str, x: torch.Tensor, which: tuple[str, ...]) -> dict[str, float]:
    if x.numel() == 0:
        return {f"{prefix}/{k}": float("nan") for k in which}
    ops = {"min": torch.min, "mean": torch.mean, "max": torch.max}
    return {f"{prefix}/{k}": float(ops[k](x.float())) for k in which}


def entropy_mean(entropy: torch.Tensor, sample_mask: torch.Tensor | None = None) -> float:
    """The logged ``entropy`` metric: mean over the bits of the samples that count. entropy: [B, N, ...]."""
    e = entropy.reshape(entropy.shape[0], -1).float()
    if sample_mask is None:
        return float(e.mean())
    w = sample_mask.to(device=e.device, dtype=e.dtype).reshape(-1, 1).expand_as(e)
    return float(_masked_mean(e, w)) if bool(w.any()) else math.nan


# ----------------------------------------------------------------------------------------------------------------
# Failure budget (the driver stops a run that trains on nothing)
# ----------------------------------------------------------------------------------------------------------------


def count_reasons(reasons: Sequence[str], limit: int = 3) -> str:
    """'12x <reason>; 4x <reason>' for the distinct non-empty reasons, most frequent first, at most ``limit`` of
    them (then '+k more')."""
    counts = collections.Counter(r for r in reasons if r)
    if not counts:
        return "no reason recorded"
    top = [f"{n}x {reason}" for reason, n in counts.most_common(limit)]
    more = len(counts) - len(top)
    return "; ".join(top) + (f"; +{more} more" if more > 0 else "")


class FailureBudget:
    """Past ``max_fraction`` of the prompt groups excluded (a failed decode or reward, no applicable reward) over
    the last ``window`` steps, a run is training on almost nothing: ``record`` then returns why, to stop with.

    The window must be full before it judges, so one bad step at the start does not end a run. ``max_fraction``
    1.0 never stops (a fraction cannot exceed it)."""

    def __init__(self, max_fraction: float, window: int):
        if not 0.0 <= max_fraction <= 1.0 or window < 1:
            raise ValueError(f"failure budget: max_fraction={max_fraction} must be in [0, 1] and window={window} >= 1")
        self.max_fraction, self.window = max_fraction, window
        self.steps: collections.deque = collections.deque(maxlen=window)  # (excluded groups, groups, reasons)

    def record(self, excluded_groups: int, groups: int, reasons: Sequence[str]) -> str | None:
        """One step's count and the exclusion reasons of its samples; returns the stop message or None."""
        self.steps.append((excluded_groups, groups, list(reasons)))
        if len(self.steps) < self.window:
            return None
        excluded = sum(s[0] for s in self.steps)
        total = sum(s[1] for s in self.steps)
        if not total or excluded / total <= self.max_fraction:
            return None
        causes = count_reasons([r for s in self.steps for r in s[2]])
        return (f"{excluded} of {total} prompt groups ({excluded / total:.0%}) were excluded over the last "
                f"{self.window} steps, more than grpo.max_excluded_fraction={self.max_fraction} "
                f"(grpo.failure_window={self.window}); causes (samples): {causes}")
