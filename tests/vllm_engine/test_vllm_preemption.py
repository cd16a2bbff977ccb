"""Continuous batching under KV pressure: 4 usable KV blocks (512 tokens) for about 1,500 tokens of requests force
vLLM to preempt and recompute; the replayed image tokens must read back the same bits, and the rows of a CFG sample
must stay in step through it, so results equal the torch engine's (cfg 1, cfg 2.5 in both modes, edit at cfg 2)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from uniar_ray.model import UniARPolicy
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

pytestmark = pytest.mark.slow  # its own vLLM start (~20 s on 2 cores)

# 640 tokens (5 blocks of 128; vLLM keeps one back) x 6 attention layers x (k, v) x 1 kv-head x 32 dims x fp32
KV_GIB = 640 * 6 * 2 * 32 * 4 / 2**30


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 160, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _requests():
    words = lambda i: f"prompt {i} " + "word " * (3 * i)  # noqa: E731 - unequal prompt lengths
    return [GenerationRequest(words(0), 512, 256, seed=0, temperature=0.9),
            GenerationRequest(words(1), 512, 256, seed=1, temperature=0.9),
            GenerationRequest(words(2), 512, 256, seed=2, cfg_scale=2.5, cfg_mode="reference"),
            GenerationRequest(words(3), 512, 256, seed=3, cfg_scale=2.5, cfg_mode="shared"),
            GenerationRequest("make it red", 256, 256, seed=4, cfg_scale=2.0, image=_png())]


def test_preemption_replays_the_same_bits(tiny_checkpoint):
    from uniar_ray.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(tiny_checkpoint, max_batch=4, kvcache_gib=KV_GIB, max_model_len=384,
                               max_num_batched_tokens=32)
    try:
        out = engine.generate(_requests())
        (counters,) = engine.llm.collective_rpc("uniar_counters")
    finally:
        engine.close()
    assert counters["replayed_image_tokens"] > 0  # a preemption did happen
    assert counters["replayed_cfg_image_tokens"] > 0  # ... to a row of a CFG sample
    assert counters["partner_waits"] > 0  # a row's logits waited for its partner's (unequal prompt lengths)
    assert counters["live_requests"] == 0 and counters["live_samples"] == 0  # no sampler state left behind
    ref = TorchRolloutEngine(UniARPolicy.from_pretrained(tiny_checkpoint)).generate(_requests())
    for a, b in zip(out, ref):
        assert torch.equal(a.bits(), b.bits()) and np.abs(a.logprobs - b.logprobs).max() <= 1e-4
