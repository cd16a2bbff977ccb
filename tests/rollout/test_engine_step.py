"""The torch engine's fast paths (fused projections, static-shape step, unmasked attention) give the plain path's
bits, follow weight updates, and the attention back-ends agree; flash-attn's unpadding is checked with a stand-in."""
from __future__ import annotations

import copy
import io
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uniar_ray.model import UniARPolicy
from uniar_ray.model.layers import Attention, FusedLinear, OneDNNWeight, PackedLinear, attention_mask, pack_linears
from uniar_ray.model.tiny import tiny_config
from uniar_ray.rollout import GenerationRequest, Rollout, TorchRolloutEngine


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _requests():
    # mixed prompt lengths (left padding), both CFG modes, no CFG, and an edit request
    return [GenerationRequest("a red cat", 64, 96, seed=1, cfg_scale=2.5),
            GenerationRequest("two dogs on a wooden bench under a tree", 64, 96, seed=2, cfg_scale=2.5,
                              cfg_mode="shared"),
            GenerationRequest("a poster", 64, 96, seed=3),
            GenerationRequest("make it blue", 64, 96, seed=4, cfg_scale=2.0, image=_png())]


@pytest.fixture(scope="module")
def policies(tiny_checkpoint):
    return [UniARPolicy.from_pretrained(tiny_checkpoint) for _ in range(3)]


def test_fast_paths_give_the_plain_paths_bits(policies):
    plain = TorchRolloutEngine(policies[0], fuse=False).generate(_requests())
    fused = TorchRolloutEngine(policies[1]).generate(_requests())
    static = TorchRolloutEngine(policies[2], static_shapes=True).generate(_requests())
    for a, b, c in zip(plain, fused, static):
        assert isinstance(a, Rollout)
        assert torch.equal(a.bits(), b.bits()) and torch.equal(a.bits(), c.bits())
        assert np.abs(a.logprobs - b.logprobs).max() < 1e-5 and np.abs(a.logprobs - c.logprobs).max() < 1e-5


def test_unpadded_batch_uses_no_mask_and_matches_alone(policies):
    engine = TorchRolloutEngine(policies[1])
    same_len = [GenerationRequest(f"prompt number {i}", 64, 64, seed=i) for i in range(3)]
    batch = engine.generate(same_len)
    alone = [engine.generate([r])[0] for r in [GenerationRequest(f"prompt number {i}", 64, 64, seed=i)
                                               for i in range(3)]]
    for a, b in zip(batch, alone):
        assert torch.equal(a.bits(), b.bits())


def test_fused_projections_follow_updates_saves_and_casts(tiny_checkpoint, tmp_path):
    fused = UniARPolicy.from_pretrained(tiny_checkpoint)
    engine = TorchRolloutEngine(fused)
    new = {k: v * 1.3 for k, v in fused.state_dict().items() if ".self_attn." in k or ".mlp." in k}
    engine.update_weights(new)
    reference = UniARPolicy.from_pretrained(tiny_checkpoint)
    reference.load_state_dict({**reference.state_dict(), **new})
    req = lambda: [GenerationRequest("a red cat", 64, 64, seed=9)]  # noqa: E731
    got = engine.generate(req())[0]
    want = TorchRolloutEngine(reference, fuse=False).generate(req())[0]
    assert np.abs(got.logprobs - want.logprobs).max() < 1e-5
    fused.save_pretrained(tmp_path / "saved")  # views into one fused buffer must still save
    assert torch.equal(UniARPolicy.from_pretrained(tmp_path / "saved").state_dict()["lm_head.weight"],
                       fused.state_dict()["lm_head.weight"])
    fused.to(torch.bfloat16)  # the cast replaces the weights: the fused copy must follow, never go stale
    reference.to(torch.bfloat16)
    got = engine.generate(req())[0]
    want = TorchRolloutEngine(reference, fuse=False).generate(req())[0]
    assert np.abs(got.logprobs - want.logprobs).max() < 1e-6


def test_cuda_graph_needs_cuda(policies):
    with pytest.raises(ValueError, match="CUDA"):
        TorchRolloutEngine(policies[0], cuda_graph=True)


def _attn(impl):
    torch.manual_seed(0)
    layer = Attention(tiny_config(num_attention_heads=4, num_key_value_heads=2).text_config)
    layer.impl = impl
    return layer


@pytest.mark.parametrize("t,start", [(1, 9), (10, 0), (3, 7)])
def test_sdpa_without_mask_equals_explicit_mask_and_eager(t, start):
    sdpa, eager = _attn("sdpa"), _attn("eager")
    x = torch.randn(2, t, sdpa.q_proj.in_features)
    cos, sin = torch.ones(2, t, sdpa.head_dim), torch.zeros(2, t, sdpa.head_dim)
    from uniar_ray.model.layers import KVCache
    outs = []
    for layer, mask in ((sdpa, None), (sdpa, "explicit"), (eager, None)):
        cache = KVCache(1, 2, layer.n_kv, start + t, layer.head_dim, torch.float32, "cpu")
        torch.manual_seed(1)
        cache.k[0].normal_(), cache.v[0].normal_()
        m = attention_mask(torch.ones(2, start + t, dtype=torch.bool), t) if mask else None
        with torch.no_grad():
            outs.append(layer(x, cos, sin, m, cache, 0, start))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


def test_flash_attention_unpads_left_padding(monkeypatch):
    """flash-attn is GPU-only; a stand-in with its signatures (per-sequence SDPA, bottom-right causal) checks our
    unpadding: the padded rows' valid positions equal the eager result on the same mask."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        out = []
        for i in range(len(cu_q) - 1):
            qi, ki, vi = (x.transpose(0, 1)[None] for x in (q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]],
                                                               v[cu_k[i]:cu_k[i + 1]]))
            rep = qi.shape[1] // ki.shape[1]
            ki, vi = ki.repeat_interleave(rep, 1), vi.repeat_interleave(rep, 1)
            m = torch.ones(qi.shape[2], ki.shape[2], dtype=torch.bool).tril(ki.shape[2] - qi.shape[2])
            out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m)[0].transpose(0, 1))
        return torch.cat(out)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen,
                                                                         flash_attn_func=None))
    flash, eager = _attn("flash_attention_2"), _attn("eager")
    x = torch.randn(2, 6, flash.q_proj.in_features)
    cos, sin = torch.ones(2, 6, flash.head_dim), torch.zeros(2, 6, flash.head_dim)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    mask = attention_mask(valid, 6)
    with torch.no_grad():
        a, b = flash(x, cos, sin, mask), eager(x, cos, sin, mask)
    assert torch.allclose(a[0, 2:], b[0, 2:], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_flash_attention_missing_says_what_to_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    layer = _attn("flash_attention_2")
    x = torch.randn(1, 2, layer.q_proj.in_features)
    with pytest.raises(ImportError, match="attn_impl='sdpa'"), torch.no_grad():
        layer(x, torch.ones(1, 2, layer.head_dim), torch.zeros(1, 2, layer.head_dim), None)


@pytest.mark.slow
def test_compiled_layers_give_the_same_bits(tiny_checkpoint):
    """compile=True (Inductor-fused elementwise work around the matmuls) is the same math: fp32 bits unchanged."""
    reqs = lambda: [GenerationRequest("a red cat", 64, 64, seed=1, cfg_scale=2.5),  # noqa: E731
                    GenerationRequest("two dogs on a bench", 64, 64, seed=2)]
    eager = TorchRolloutEngine(UniARPolicy.from_pretrained(tiny_checkpoint)).generate(reqs())
    compiled = TorchRolloutEngine(UniARPolicy.from_pretrained(tiny_checkpoint), compile=True).generate(reqs())
    for a, b in zip(eager, compiled):
        assert torch.equal(a.bits(), b.bits()) and np.abs(a.logprobs - b.logprobs).max() < 1e-4


def test_config_reaches_the_engine():
    """model.attn_impl and rollout.cuda_graph/compile are read by the one engine factory (actor and eval)."""
    from uniar_ray.config import ConfigError, ModelConfig, RolloutConfig
    from uniar_ray.rollout.factory import build_engine

    engine = build_engine(ModelConfig(attn_impl="eager"), RolloutConfig(max_batch=3))
    assert engine.max_batch == 3 and not engine.cuda_graph
    assert {m.impl for m in engine.policy.modules() if hasattr(m, "impl")} == {"eager"}
    with pytest.raises(ValueError, match="cuda_graph=True needs the policy on a CUDA device"):
        build_engine(ModelConfig(), RolloutConfig(cuda_graph=True))
    with pytest.raises(ConfigError, match="apply to rollout.backend=torch"):
        RolloutConfig(backend="vllm", compile=True)
    with pytest.raises(ConfigError, match="model.attn_impl"):
        ModelConfig(attn_impl="flash")


def test_cpu_packed_projections_match_and_follow_in_place_updates(policies):
    torch.manual_seed(0)
    lins = [torch.nn.Linear(32, 24), torch.nn.Linear(32, 8)]
    fused = FusedLinear(lins, pack=True)
    single = torch.nn.Linear(32, 16)
    pack_linears(single)
    x = torch.randn(5, 3, 32)
    with torch.no_grad():
        want = [lin(x) for lin in lins] + [F.linear(x, single.weight, single.bias)]
        assert OneDNNWeight.applies(single.weight), "this CPU build has oneDNN: the packed path must be what runs"
        for got, ref in zip([*fused(x), single(x)], want):
            assert (got - ref).abs().max() < 1e-5
        assert fused.onednn.packed is not None and single.onednn.packed is not None
        lins[1].weight.mul_(-2.0)  # in-place updates (as update_weights does) must reach the packed copies
        single.weight.mul_(-2.0)
        assert (fused(x)[1] - lins[1](x)).abs().max() < 1e-5
        assert (single(x) + 2 * want[2] - 3 * single.bias).abs().max() < 1e-5
        big = torch.randn(OneDNNWeight.MAX_ROWS + 1, 32)  # prefill-sized: the plain kernel (bounded memory)
        assert torch.equal(single(big), F.linear(big, single.weight, single.bias))
    copy.deepcopy(single)  # oneDNN's opaque tensor is dropped, not copied
    engine = TorchRolloutEngine(policies[1])
    layer = engine.policy.model.language_model.layers[0]
    assert layer.self_attn.qkv.onednn is not None and isinstance(layer.mlp.down_proj, PackedLinear)


def test_multinomial_baseline_sampler_draws_from_the_same_distribution(policies):
    """The reference's sampler (for the baseline): at T = 0.1 the drawn bits are the likely ones, and their log-probs
    are those of the thresholded sampler's distribution (same logits)."""
    torch.manual_seed(0)
    reqs = lambda: [GenerationRequest("a red cat", 64, 64, seed=5, temperature=0.1)]  # noqa: E731
    engine = TorchRolloutEngine(policies[1], recompute_visual_stack=True, multinomial_sampler=True)
    got = engine.generate(reqs())[0]
    assert np.exp(got.logprobs).mean() > 0.8  # an inverted draw would give < 0.2
    want = TorchRolloutEngine(policies[1], recompute_visual_stack=True).generate(reqs())[0]
    assert np.exp(want.logprobs).mean() > 0.8
    with pytest.raises(ValueError, match="no static form"):
        TorchRolloutEngine(policies[1], multinomial_sampler=True, static_shapes=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_path_is_bit_identical_to_the_separate_one(dtype):
    """q/k normalised and rotated together (the inference path) == apart (the training path), same weights."""
    from uniar_ray.model.tiny import bench_config

    cfg = bench_config().text_config
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    attn.to(dtype)
    attn.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj])  # unpacked: same matmul kernel both ways
    x = torch.randn(4, 3, cfg.hidden_size, dtype=dtype)
    cos, sin = torch.randn(4, 3, cfg.head_dim), torch.randn(4, 3, cfg.head_dim)
    with torch.enable_grad():
        apart = [t.detach() for t in attn.project(x, cos, sin)]
    with torch.no_grad():
        together = attn.project(x, cos, sin)
    for a, b in zip(apart, together):
        assert a.shape == b.shape and torch.equal(a, b)


def test_compiled_layers_are_inference_only(policies, monkeypatch):
    """A trainer that shares the policy with a compiled engine (colocated rollout) trains through the eager layers;
    sampling uses the compiled ones."""
    from uniar_ray.model import layers

    calls = []
    monkeypatch.setattr(layers, "_COMPILED", {"pre": lambda *a: calls.append("pre") or layers._pre(*a),
                                              "post": lambda *a: calls.append("post") or layers._post(*a)})
    policy = copy.deepcopy(policies[0])
    for m in policy.modules():
        if isinstance(m, layers.DecoderLayer):
            m.compiled = True
    ids = policy.tokenizer(["a red cat<|vision_start|>"], return_tensors="pt")["input_ids"]
    bits = torch.randint(0, 2, (1, 4, *policy.bits_shape), dtype=torch.uint8)
    policy.bit_logits(ids, torch.ones_like(ids), bits, 64, 64).float().sum().backward()
    assert calls == [] and policy.visual_decoder[0].mlp.down_proj.weight.grad is not None
    with torch.no_grad():
        policy.bit_logits(ids, torch.ones_like(ids), bits, 64, 64)
    n_layers = len(policy.model.language_model.layers) + len(policy.visual_decoder)
    assert calls.count("pre") == calls.count("post") == n_layers
