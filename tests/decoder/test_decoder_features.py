"""Bits -> decoder features (spec §8.1): level interleaving, raster order, per-level projections, pruned loading."""
from __future__ import annotations

import math

import pytest
import torch

from uniar_ray.decoder.features import decoder_features, interleave_levels, load_bsq_projections, raster_order
from uniar_ray.decoder.tiny import build_tiny_bsq_encoder, random_bits
from uniar_ray.model.loading import CheckpointMismatch, save_safetensors


def test_levels_interleave_per_channel():
    # level l, channel h holds 10*l + h: channel c = h*L + l
    levels = [torch.tensor([[0.0, 1, 2]]) + 10 * l for l in range(2)]
    assert interleave_levels(levels).tolist() == [[0, 10, 1, 11, 2, 12]]


def test_raster_order_hand_computed():
    # rows (token n, sub-patch s) hold 100*n + s; merge 2, so s = 2*dy + dx inside each 2x2 window
    rows = torch.tensor([[100.0 * n + s] for n in range(2) for s in range(4)])
    wide = raster_order(rows, batch=1, grid_h=2, grid_w=4, merge=2)  # 1x2 tokens side by side
    assert wide[0, :, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103]
    tall = raster_order(rows, batch=1, grid_h=4, grid_w=2, merge=2)  # 2x1 tokens stacked
    assert tall[0, :, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    two = raster_order(torch.cat([rows, rows + 1000]), batch=2, grid_h=2, grid_w=4, merge=2)
    assert two[1, :, 0].tolist() == [1000, 1001, 1100, 1101, 1002, 1003, 1102, 1103]


@pytest.mark.parametrize("deepstack_norm", [False, True])
def test_features_match_a_per_patch_loop(deepstack_norm):
    vision = build_tiny_bsq_encoder(seed=3)
    cfg = vision.cfg
    h, w = 64, 128  # non-square: 2x4 tokens, 4x8 patches
    bits = random_bits(2, h, w, seed=5)
    feats = decoder_features(vision, bits, h, w, deepstack_norm=deepstack_norm)
    gh, gw, L = h // 16, w // 16, cfg.num_levels
    assert feats.shape == (2, gh * gw, L * cfg.hidden_size)
    projs = [getattr(vision, name) for name in vision.level_names("output")]
    with torch.no_grad():
        for b in range(2):
            for r in range(gh):
                for c in range(gw):
                    n, s = (r // 2) * (gw // 2) + c // 2, (r % 2) * 2 + c % 2
                    for l in range(L):
                        code = (bits[b, n, l, s].float() * 2 - 1) / math.sqrt(cfg.bsq_dim)
                        f = projs[l](code[None])[0]
                        if deepstack_norm and l > 0:
                            f = vision.merger.norm(f)
                        got = feats[b, r * gw + c, l::L]  # channel h*L + l
                        torch.testing.assert_close(got, f, rtol=1e-5, atol=1e-6)


def _write_bsq(folder, state, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_safetensors(state, folder / "model.safetensors")


def test_pruned_loading_keeps_only_the_projections(tmp_path):
    full = build_tiny_bsq_encoder(seed=1)
    _write_bsq(tmp_path / "bsq", full.state_dict(), full.cfg)
    pruned = load_bsq_projections(tmp_path / "bsq", dtype=torch.float32)
    kept = {k.split(".")[0] for k in pruned.state_dict()}
    assert kept == set(full.level_names("output")) | {"merger"}
    assert set(pruned.merger.state_dict()) == {"norm.weight", "norm.bias"}
    bits = random_bits(1, 64, 64, seed=2)
    for norm in (False, True):
        a = decoder_features(pruned, bits, 64, 64, deepstack_norm=norm)
        b = decoder_features(full, bits, 64, 64, deepstack_norm=norm)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bsq_encoder_is_checked_whole(tmp_path):
    """Every tensor of the file is checked against the config, also those the decoder does not keep."""
    full = build_tiny_bsq_encoder(seed=1)
    state = dict(full.state_dict())
    state.pop("blocks.1.attn.qkv.weight")  # a ViT tensor the decoder never uses
    state["extra.weight"] = torch.zeros(2)
    state["bsq_output_proj_list_0.linear_fc1.weight"] = torch.zeros(3, 3)
    _write_bsq(tmp_path / "bad", state, full.cfg)
    with pytest.raises(CheckpointMismatch) as err:
        load_bsq_projections(tmp_path / "bad")
    msg = str(err.value)
    assert "missing (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "bsq_output_proj_list_0.linear_fc1.weight: file (3, 3) vs model (32, 64)" in msg
