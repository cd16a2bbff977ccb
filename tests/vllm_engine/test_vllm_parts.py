"""vLLM engine parts that need no running engine: plugin registration, the bits payload, weight-update names."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch


def test_plugin_entry_point_registers_the_model():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = next(e for e in eps if e.name == "uniar")
    ep.load()()
    from vllm import ModelRegistry

    from uniar_ray.rollout.vllm_engine.plugin import ARCHITECTURE

    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_payload_round_trip():
    from uniar_ray.rollout.vllm_engine.runner import decode_payload, encode_payload

    g = torch.Generator().manual_seed(0)
    bits = (torch.rand(3, 4, 4, 64, generator=g) < 0.5).to(torch.uint8)
    logp = -torch.rand(3, 4, 4, 64, generator=g)
    payload = encode_payload(bits, logp)
    assert payload.dtype == torch.uint8 and payload.numel() == 3 * 1024 // 8 + 4 * 3 * 1024
    b2, l2 = decode_payload(payload, (3, 4, 4, 64))
    assert torch.equal(b2, bits) and torch.equal(l2, logp)
    with pytest.raises(ValueError, match="expected"):
        decode_payload(payload[:-1], (3, 4, 4, 64))


def test_update_names_need_whole_modules():
    from uniar_ray.rollout.vllm_engine.engine import check_update_names

    layer = "model.language_model.layers.0"
    expected = {f"{layer}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    check_update_names(expected, expected)
    check_update_names({f"{layer}.self_attn.o_proj.weight", "lm_head.weight"}, expected)  # unused names: ignored
    with pytest.raises(KeyError, match="partly"):
        check_update_names({f"{layer}.self_attn.q_proj.weight"}, expected)
    with pytest.raises(KeyError, match="unknown"):
        check_update_names({"model.nope.weight"}, expected)


def test_what_the_platform_cannot_run_is_refused_before_vllm_starts(monkeypatch):
    """bf16 (crashes vLLM's CPU backend here), a GPU (Model Runner V2 bypasses our V1 runner) and another vLLM
    release are refused at construction, each naming what to use instead."""
    from vllm.platforms import current_platform

    from uniar_ray.config import ModelConfig
    from uniar_ray.rollout.vllm_engine import VLLMRolloutEngine
    from uniar_ray.rollout.vllm_engine.engine import check_platform

    with pytest.raises(ValueError, match="model.dtype=float32, or use rollout.backend=torch"):
        VLLMRolloutEngine.from_model_config(ModelConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match="use rollout.backend=torch on GPU"):
        VLLMRolloutEngine.from_model_config(ModelConfig(device="cuda"))
    with pytest.raises(RuntimeError, match="pinned to vLLM 0.32.0.*rollout.backend=torch"):
        check_platform("0.31.1")
    check_platform("0.32.0")
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    with pytest.raises(RuntimeError, match="Model Runner V2.*Use rollout.backend=torch"):
        check_platform("0.32.0")
