"""Continuous batching under KV pressure: a KV cache of 384 tokens for four 160-token requests forces vLLM to
preempt and recompute; the replayed image tokens must read back the same bits, so results equal the torch engine's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from uniar_ray.model import UniARPolicy
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

pytestmark = pytest.mark.slow  # its own vLLM start (~20 s on 2 cores)

KV_GIB = 384 * 6 * 2 * 32 * 4 / 2**30  # 384 tokens x 6 attention layers x (k, v) x 1 kv-head x 32 dims x fp32


def test_preemption_replays_the_same_bits(tiny_checkpoint):
    from uniar_ray.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(tiny_checkpoint, max_batch=4, kvcache_gib=KV_GIB, max_model_len=256,
                               max_num_batched_tokens=32)
    try:
        reqs = lambda: [GenerationRequest(f"prompt {i} " + "word " * (3 * i), 512, 256, seed=i, temperature=0.9)  # noqa: E731
                        for i in range(4)]
        out = engine.generate(reqs())
        (counters,) = engine.llm.collective_rpc("uniar_counters")
    finally:
        engine.close()
    assert counters["replayed_image_tokens"] > 0  # a preemption did happen
    ref = TorchRolloutEngine(UniARPolicy.from_pretrained(tiny_checkpoint)).generate(reqs())
    for a, b in zip(out, ref):
        assert torch.equal(a.bits(), b.bits()) and np.abs(a.logprobs - b.logprobs).max() <= 1e-4
