"""AdamW over low-precision (bf16) parameters with an fp32 master copy and fp32 moments, the parameters updated in
place: the state DeepSpeed's bf16 optimizer keeps, for a one-process trainer without DeepSpeed (perf/gpu_grpo.py).

    opt = MasterWeightAdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-6, max_grad_norm=1.0)
    loss.backward(); grad_norm = opt.step(); opt.zero_grad()

Why in place: a rollout engine colocated with the trainer reads the parameters' storage (fused projection buffers
whose views the parameters are, oneDNN packs keyed on the version counter, compiled kernels and CUDA graphs that
captured the addresses). ``step`` writes ``p.copy_(master)`` under ``no_grad``: same storage, version counter bumped,
so each of those stays valid or is rebuilt. Writing through ``p.data`` would skip the version counter (stale packs).
"""
from __future__ import annotations

from typing import Iterable

import torch


class MasterWeightAdamW:
    """torch.optim.AdamW stepping fp32 masters of ``params``; each step's rounded result is copied into the params.

    The fp32 gradients exist one bucket (``bucket_numel`` elements, at least one parameter) at a time, so the
    optimizer's temporary memory is bounded: the resident state is 4 bytes (master) + 8 bytes (moments) per element,
    beside the parameters and their own-dtype gradients. ``max_grad_norm`` > 0 clips the total gradient norm
    (computed in fp32 over every gradient, as ``torch.nn.utils.clip_grad_norm_`` with its 1e-6) before the update.
    Parameters whose gradient is None are skipped (their moments do not advance), as torch's AdamW does.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_grad_norm: float = 0.0, bucket_numel: int = 1 << 26, fused: bool | None = None):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("MasterWeightAdamW: no parameters to optimise")
        if max_grad_norm < 0 or bucket_numel < 1:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be >= 0 and bucket_numel={bucket_numel} >= 1")
        with torch.no_grad():
            self.masters = [p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self.max_grad_norm = max_grad_norm
        self.buckets = _buckets([p.numel() for p in self.params], bucket_numel)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.opt.param_groups[0]["lr"] = value

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The total 2-norm of the parameters' gradients, in fp32 (0-d tensor on the first parameter's device)."""
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in self.params if p.grad is not None]
        if not norms:
            return torch.zeros((), device=self.params[0].device)
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

    @torch.no_grad()
    def step(self) -> float:
        """One AdamW step of every parameter that has a gradient; returns the total gradient norm before clipping."""
        total = self.grad_norm()
        scale = None
        if self.max_grad_norm > 0:
            scale = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        for bucket in self.buckets:
            live = [i for i in bucket if self.params[i].grad is not None]
            for i in live:
                g = self.params[i].grad.float()
                self.masters[i].grad = g.mul_(scale) if scale is not None else g
            if live:
                self.opt.step()
            for i in live:
                self.masters[i].grad = None
                self.params[i].copy_(self.masters[i])  # in place: same storage, version counter bumped
        return float(total)

    def state_bytes(self) -> dict[str, int]:
        """Resident bytes of the optimizer's own state: fp32 masters and the two fp32 moments (allocated at the
        first step)."""
        n = sum(m.numel() for m in self.masters)
        return {"master": 4 * n, "moments": 8 * n}


def _buckets(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total is at most ``limit`` (a larger item is a group alone)."""
    out: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if out[-1] and total + n > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out
