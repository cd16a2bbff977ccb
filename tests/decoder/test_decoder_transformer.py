"""SD3 transformer with BSQ injection (spec §8.2): stock SD3 when nothing is injected, the injection point, bicubic
upsampling (non-square too) and strict loading."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from uniar_ray.decoder.tiny import build_tiny_transformer
from uniar_ray.decoder.transformer import SD3TransformerWithBSQ
from uniar_ray.model.loading import CheckpointMismatch, read_safetensors, save_safetensors


def _inputs(model, batch=2, lat=(8, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, *lat, generator=g)
    text = torch.randn(batch, 7, c.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g)
    t = torch.tensor([500.0] * batch)
    return x, text, pooled, t


def _explicit_forward(m, x, text, pooled, t, added):
    """SD3 written out step by step, with ``added`` put on the latent tokens after the patch embedding."""
    h = m.pos_embed(x) + added
    temb = m.time_text_embed(t, pooled)
    e = m.context_embedder(text)
    for block in m.transformer_blocks:
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb)
    h = m.proj_out(m.norm_out(h, temb))
    p, (hh, ww) = m.config.patch_size, m.token_grid(*x.shape[-2:])
    h = h.reshape(x.shape[0], hh, ww, p, p, m.out_channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(x.shape[0], m.out_channels, hh * p, ww * p)


@torch.no_grad()
def test_injection_is_added_to_the_latent_tokens():
    m = build_tiny_transformer(seed=0)
    x, text, pooled, t = _inputs(m)
    tokens = torch.randn(2, 4 * 6, m.inner_dim, generator=torch.Generator().manual_seed(1))
    got = m(x, text, pooled, t, feature_tokens=tokens, return_dict=False)[0]
    want = _explicit_forward(m, x, text, pooled, t, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = m(x, text, pooled, t, return_dict=False)[0]
    assert (got - plain).abs().mean() > 1e-3  # the injection changes the output
    assert not m.pos_embed._forward_hooks  # the hook is removed after the call


@torch.no_grad()
def test_without_injection_it_is_stock_sd3():
    m = build_tiny_transformer(seed=0, injection_std=0.0)
    stock = SD3Transformer2DModel.from_config(m.config)  # drops the injection fields
    stock.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("siglip")}, strict=True)
    x, text, pooled, t = _inputs(m)
    feats = torch.randn(2, 4 * 6, m.config.siglip_channels)
    tokens = m.embed_features(feats, (4, 6), (4, 6))
    assert tokens.abs().max() == 0  # zero-initialised projection
    torch.testing.assert_close(m(x, text, pooled, t, feature_tokens=tokens, return_dict=False)[0],
                               stock(x, text, pooled, t, return_dict=False)[0], rtol=0, atol=0)


@torch.no_grad()
def test_embed_features_without_upsampling():
    m = build_tiny_transformer(seed=0, super_resolution=False)
    m.register_to_config(image_token_scale_factor=0.5)
    feats = torch.randn(2, 4 * 6, m.config.siglip_channels)
    got = m.embed_features(feats, (4, 6), (4, 6))
    torch.testing.assert_close(got, 0.5 * feats @ m.siglip_embed_add_latent.weight.T)
    with pytest.raises(ValueError, match="super_resolution=false"):
        m.embed_features(feats, (4, 6), (8, 12))


@torch.no_grad()
def test_embed_features_upsamples_bicubic_on_the_true_grid():
    m = build_tiny_transformer(seed=0)
    c = m.config.siglip_channels
    grid = torch.randn(1, c, 2, 3)
    feats = grid.permute(0, 2, 3, 1).reshape(1, 6, c)  # raster order over a 2x3 grid
    got = m.embed_features(feats, (2, 3), (4, 6))
    up = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 24, c)
    torch.testing.assert_close(got, up @ m.siglip_embed_add_latent.weight.T, rtol=1e-5, atol=1e-5)
    # non-square orientation survives: features constant along each column stay constant along columns
    cols = torch.arange(3.0).view(1, 1, 1, 3).expand(1, c, 2, 3)
    m.siglip_embed_add_latent.weight.copy_(torch.eye(m.inner_dim, c))
    out = m.embed_features(cols.permute(0, 2, 3, 1).reshape(1, 6, c), (2, 3), (4, 6)).reshape(4, 6, -1)
    assert torch.allclose(out[0], out[3]) and not torch.allclose(out[:, 0], out[:, 5])


def test_strict_loading(tmp_path):
    m = build_tiny_transformer(seed=0)
    m.save_pretrained(tmp_path / "ok")
    loaded = SD3TransformerWithBSQ.from_folder(tmp_path / "ok", dtype=torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.config.super_resolution and loaded.config.siglip_channels == 128

    bad = tmp_path / "bad"
    m.save_pretrained(bad)
    state = read_safetensors(bad)
    state.pop("siglip_embed_add_latent.weight")
    state["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(3, 16)
    state["unexpected.weight"] = torch.zeros(1)
    (bad / "diffusion_pytorch_model.safetensors").unlink()
    save_safetensors(state, bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointMismatch) as err:
        SD3TransformerWithBSQ.from_folder(bad)
    msg = str(err.value)
    assert "missing (1): siglip_embed_add_latent.weight" in msg and "unexpected (1): unexpected.weight" in msg
    assert "transformer_blocks.0.attn.to_q.weight: file (3, 16) vs model (16, 16)" in msg

    cfg = json.loads((bad / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not an SD3 transformer"):
        SD3TransformerWithBSQ.from_folder(bad)
