"""Gradient checkpointing in the RL forward: activation memory with and without, and the gradients agree.

    python -m perf.grad_checkpointing [--config tiny|bench] [--ar 512] [--batch 2] [--device cuda]
One forward + backward of ``bit_logits`` -> per-bit log-probs (the trainer's micro-batch) per setting. Reports the
bytes autograd keeps for the backward pass (saved tensors, any device) and, on CUDA, the peak allocated memory
above the weights. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from uniar_ray.model import build_tiny_policy, generation_text, tokenize
from uniar_ray.model.tiny import bench_config


def saved_bytes_and_grads(policy, ids, mask, bits, ar: int) -> tuple[int, dict[str, torch.Tensor], float]:
    """Bytes of tensors autograd saves for backward (unique storages), the gradients, and the seconds taken."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    policy.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = policy.bit_logits(ids, mask, bits, ar, ar)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, bits.long().unsqueeze(-1)).squeeze(-1)
        loss = logp.mean()
    loss.backward()
    if bits.is_cuda:
        torch.cuda.synchronize()
    grads = {n: p.grad.detach().float().cpu() for n, p in policy.named_parameters() if p.grad is not None}
    return sum(seen.values()), grads, time.perf_counter() - t0


def measure(config: str = "tiny", ar: int = 64, batch: int = 2, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    policy = build_tiny_policy(0, bench_config() if config == "bench" else None).to(device).train()
    tp = tokenize(policy.tokenizer, [generation_text(f"a red cat number {i}", ar, ar) for i in range(batch)])
    n = (ar // 32) ** 2
    bits = torch.randint(0, 2, (batch, n, *policy.bits_shape), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8).to(device)
    ids, mask = tp.input_ids.to(device), tp.attention_mask.to(device)
    out: dict = {"config": config, "ar": ar, "batch": batch, "device": device}
    grads = {}
    for on in (False, True):
        policy.set_gradient_checkpointing(on)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        saved, grads[on], seconds = saved_bytes_and_grads(policy, ids, mask, bits, ar)
        key = "checkpointing" if on else "plain"
        out[f"{key}_saved_mib"] = round(saved / 2**20, 2)
        out[f"{key}_s"] = round(seconds, 3)
        if device.startswith("cuda"):
            out[f"{key}_peak_above_weights_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    out["max_grad_diff"] = max((grads[True][k] - grads[False][k]).abs().max().item() for k in grads[False])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=("tiny", "bench"), default="tiny")
    ap.add_argument("--ar", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.config, a.ar, a.batch, a.device)))


if __name__ == "__main__":
    main()
