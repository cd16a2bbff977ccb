"""The trainer's work on one generation batch as plain functions over a policy forward: micro-batches as tensors,
the fixed (reference and old) log-probs, and the per-micro-batch GRPO loss. No Ray, no DeepSpeed.

    micro = [prepare(chunk, forward, ref_forward, pad_id, cfg, device) for chunk in chunks]
    loss, metrics = micro_loss(forward, micro[0], counts, cfg)     # then backward, step
    metrics = merge_metrics([metrics_of_each_micro_batch, ...])   # max of maxima, mean of means
``forward(ids, mask, bits, h, w)`` returns ``bit_logits`` ([B, N, L, U, D, 2]): the DeepSpeed engine in the trainer
actor (ZeRO-3 gathers its shards there), the plain policy in ``perf/gpu_grpo.py``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from uniar_ray import grpo
from uniar_ray.config import GRPOConfig
from uniar_ray.model.prompts import pad_left
from uniar_ray.rollout.types import Rollout

Forward = Callable[..., torch.Tensor]


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch of a generation batch on the trainer's device."""

    ids: torch.Tensor  # [B, P] int64, left-padded prompt ids
    mask: torch.Tensor  # [B, P] attention mask
    bits: torch.Tensor  # [B, N, L, U, D] uint8
    h: int  # AR height (every sample of a batch shares the AR size)
    w: int
    adv: torch.Tensor  # [B] float32 advantages
    keep: torch.Tensor  # [B] bool: trained on (not excluded)
    rollout_logp: torch.Tensor  # [B, N, L, U, D] per-bit sampling log-probs from the rollout engine
    ref_logp: torch.Tensor | None = None  # [B, N, L, U, D] frozen reference policy (beta != 0)
    old_logp: torch.Tensor | None = None  # [B, N, L, U, D] before the first update (num_iterations > 1)

    def __len__(self) -> int:
        return self.ids.shape[0]


def batch_counts(samples: list[Rollout], num_processes: int) -> grpo.BatchCounts:
    """The loss denominators of a whole generation batch (``samples`` over all ranks)."""
    n, L, U, D = samples[0].bits_shape
    return grpo.batch_counts(torch.tensor([not s.excluded for s in samples], dtype=torch.bool), n, L * U * D,
                             num_processes)


def prepare(chunk: list[Rollout], forward: Forward, ref_forward: Forward | None, pad_id: int, cfg: GRPOConfig,
            device: torch.device | str) -> MicroBatch:
    """``chunk`` as tensors, with the log-probs that stay fixed over the ``num_iterations`` passes: reference
    (``ref_forward``, when beta != 0) and old (num_iterations > 1), computed before any update of this batch."""
    tp = pad_left([s.prompt_ids.tolist() for s in chunk], pad_id, device)
    bits = torch.stack([s.bits() for s in chunk]).to(device)
    x = MicroBatch(ids=tp.input_ids, mask=tp.attention_mask, bits=bits, h=chunk[0].ar_height, w=chunk[0].ar_width,
                   adv=torch.tensor([s.advantage for s in chunk], device=device, dtype=torch.float32),
                   keep=torch.tensor([not s.excluded for s in chunk], device=device),
                   rollout_logp=torch.stack([torch.from_numpy(s.logprobs) for s in chunk]).to(device))
    with torch.no_grad():
        if ref_forward is not None:
            x.ref_logp = grpo.bit_logprobs(ref_forward(x.ids, x.mask, bits, x.h, x.w), bits, cfg)
        if cfg.num_iterations > 1:
            x.old_logp = grpo.bit_logprobs(forward(x.ids, x.mask, bits, x.h, x.w), bits, cfg)
    return x


def micro_loss(forward: Forward, x: MicroBatch, counts: grpo.BatchCounts,
               cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch (normalised over the whole batch by ``counts``) and its metrics."""
    logits = forward(x.ids, x.mask, x.bits, x.h, x.w)
    logp = grpo.bit_logprobs(logits, x.bits, cfg)
    loss, metrics = grpo.policy_loss(logp, x.adv, cfg, old_logp=x.old_logp, ref_logp=x.ref_logp,
                                     rollout_logp=x.rollout_logp, sample_mask=x.keep, batch=counts)
    with torch.no_grad():
        metrics["entropy"] = grpo.entropy_mean(grpo.bit_entropy(logits, cfg), x.keep)
    return loss, metrics


def merge_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of several micro-batches (or passes, or ranks) as one: ``*/max`` keys take the max, ``*/min``
    the min, ``*/mean`` and ``*_frac`` the mean, each over the rows that have a number (a micro-batch whose samples
    are all excluded has NaN there); any other key is the plain mean (a NaN loss stays NaN: the driver stops on it).
    Means are unweighted: micro-batches are equal but for a short last one."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [float(row[key]) for row in rows if key in row]
        finite = [v for v in values if not math.isnan(v)]
        if key.endswith(("/max", "/min", "/mean", "_frac")):
            if not finite:
                out[key] = math.nan
            else:
                out[key] = max(finite) if key.endswith("/max") else min(finite) if key.endswith("/min") \
                    else sum(finite) / len(finite)
        else:
            out[key] = sum(values) / len(values)
    return out
