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


def usable_attn(requested: str, device: str) -> tuple[str, str | None]:
    """The attention kernel ``requested`` (the reference's ``--attn``) as this machine can run it, and a line saying
    why when it cannot: flash_attention_2 needs CUDA (without it: eager, as the reference's chat.py falls back) and
    the flash-attn package (without it: sdpa, the fastest kernel that needs nothing)."""
    import importlib.util

    if requested != "flash_attention_2":
        return requested, None
    if not str(device).startswith("cuda"):
        return "eager", f"flash_attention_2 requires CUDA (device {device}); using eager attention instead"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash_attention_2 needs the flash-attn package, which is not installed; using sdpa instead"
    return requested, None
