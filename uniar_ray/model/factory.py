"""Build the policy a config names: ``tiny`` (seeded, built in memory) or a checkpoint path.

Used by every job and actor so that "which model" is decided in one place.
"""
from __future__ import annotations

import torch

from .policy import UniARPolicy
from .tiny import build_tiny_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_policy(path: str = "tiny", dtype: str = "float32", device: str = "cpu", tiny_seed: int = 0,
                attn_impl: str = "sdpa") -> UniARPolicy:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if attn_impl == "flash_attention_2":  # this node's environment: checked here, before any weights are read
        from uniar_ray.config.feasibility import require_flash_attn

        require_flash_attn()
    if path == "tiny":
        policy = build_tiny_policy(seed=tiny_seed, dtype=DTYPES[dtype]).to(device)
        policy.set_attn_impl(attn_impl)
        return policy
    return UniARPolicy.from_pretrained(path, dtype=DTYPES[dtype], device=device, attn_impl=attn_impl)
