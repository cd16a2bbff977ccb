"""Invariants behind the parity with the public reference (spec §3-5, §7.6) that need no reference install.

The numeric comparison itself (reference RL forward vs ``bit_logits``, positions, features, vision tower) was run
once against the reference in a throw-away environment; these tests pin the facts it relied on.
"""
from __future__ import annotations

import json

import torch

from uniar_ray import bits as B
from uniar_ray.model import UniARPolicy, bit_logprobs, build_tiny_policy, generation_text, tokenize
from uniar_ray.model.positions import rope_positions


def _image_positions(policy, texts, h, w):
    tp = tokenize(policy.tokenizer, texts)
    return tp, policy.image_positions(tp.input_ids, tp.attention_mask, h, w)


def test_spec_golden_positions_7_token_prefix_2x2_grid(tiny_policy):
    """§4.2: unpadded prefix of 7 tokens, 2x2 AR grid: image positions (7,7,7),(7,7,8),(7,8,7),(7,8,8)."""
    cfg = tiny_policy.config
    prefix = torch.tensor([[1, 2, 7, 8, 9, 10, cfg.vision_start_token_id]])
    pos = tiny_policy.image_positions(prefix, torch.ones_like(prefix), 64, 64)
    assert pos.shape == (3, 1, 11)
    assert pos[:, 0, :7].tolist() == [list(range(7))] * 3
    assert pos[:, 0, 7:].T.tolist() == [[7, 7, 7], [7, 7, 8], [7, 8, 7], [7, 8, 8]]


def test_positions_left_padded_non_square(tiny_policy):
    """Pads get 1 on all axes; each row's image block starts at its own unpadded length; 64x128 is 2 rows x 4 cols."""
    texts = [generation_text(p, 64, 128) for p in ("a cat", "a photo of a red cat and a blue dog")]
    tp, pos = _image_positions(tiny_policy, texts, 64, 128)
    lengths = tp.attention_mask.sum(1).tolist()
    width = tp.input_ids.shape[1]
    for row, length in enumerate(lengths):
        pad = width - length
        assert (pos[:, row, :pad] == 1).all()
        assert pos[:, row, pad:width].tolist() == [list(range(length))] * 3
        image = pos[:, row, width:].T.tolist()
        assert image == [[length, length + r, length + c] for r in range(2) for c in range(4)]


def test_positions_edit_mode_grids_interleaved_across_the_batch(tiny_policy):
    """§5: grids are consumed in order [in_0, out_0, in_1, out_1]; text after the input image restarts at max + 1."""
    cfg = tiny_policy.config
    texts = [generation_text(p, 64, 128, num_input_image_tokens=4) for p in ("make it blue", "add a small dog")]
    tp = tokenize(tiny_policy.tokenizer, texts)
    b, n = tp.input_ids.shape[0], 8
    ids = torch.cat([tp.input_ids, torch.full((b, n), cfg.image_token_id)], 1)
    mask = torch.cat([tp.attention_mask, torch.ones(b, n, dtype=torch.long)], 1)
    pos = rope_positions(ids, mask, [[1, 4, 4], [1, 4, 8]] * b, image_token_id=cfg.image_token_id,
                         vision_start_token_id=cfg.vision_start_token_id)
    for row in range(b):
        real = mask[row].bool()
        row_ids, row_pos = ids[row, real].tolist(), pos[:, row, real]
        first = row_ids.index(cfg.image_token_id)  # input image block: 2x2 merged tokens
        st = first
        assert row_pos[:, first:first + 4].T.tolist() == [[st, st, st], [st, st, st + 1], [st, st + 1, st],
                                                          [st, st + 1, st + 1]]
        assert row_pos[:, first + 4].tolist() == [st + 2] * 3  # <|vision_end|> at max + 1
        out = row_pos[:, -n:]
        st_out = int(row_pos[0, -n - 1]) + 1  # after the final <|vision_start|>
        assert out.T.tolist() == [[st_out, st_out + r, st_out + c] for r in range(2) for c in range(4)]


def test_rotary_tables_stay_fp32_under_dtype_casts(tiny_checkpoint):
    """A policy cast to bf16 in memory must score exactly like one loaded in bf16 (the reference's inference path
    keeps fp32 rotary tables; an in-memory .to(bf16) used to round them and moved log-probs by ~0.05)."""
    loaded = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    cast = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.float32).to(torch.bfloat16)
    for p in (loaded, cast):
        assert p.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
        assert p.model.visual.rotary_inv_freq.dtype == torch.float32
    assert torch.equal(loaded.model.language_model.rotary_emb.inv_freq, cast.model.language_model.rotary_emb.inv_freq)
    texts = [generation_text(p, 64, 128) for p in ("a cat", "two apples, three oranges")]
    tp = tokenize(loaded.tokenizer, texts)
    bits = torch.randint(0, 2, (2, 8, 4, 4, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        a = loaded.bit_logits(tp.input_ids, tp.attention_mask, bits, ar_height=64, ar_width=128)
        b = cast.bit_logits(tp.input_ids, tp.attention_mask, bits, ar_height=64, ar_width=128)
    assert torch.equal(a, b)


def test_bf16_rope_tables_option_rounds_like_the_reference_trainer(tiny_checkpoint):
    default = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    trainer = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, bf16_rope_tables=True)
    exact = default.model.language_model.rotary_emb.inv_freq
    rounded = trainer.model.language_model.rotary_emb.inv_freq
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, exact.to(torch.bfloat16).float())
    assert not torch.equal(rounded, exact)
    assert torch.equal(trainer.model.visual.rotary_inv_freq,
                       default.model.visual.rotary_inv_freq.to(torch.bfloat16).float())
    trainer.to(torch.bfloat16)  # a later cast keeps the chosen rounding
    assert torch.equal(trainer.model.language_model.rotary_emb.inv_freq, rounded)
    trainer.set_rope_table_rounding(None)
    assert torch.equal(trainer.model.language_model.rotary_emb.inv_freq, exact)
    tp = tokenize(default.tokenizer, [generation_text("a red cat", 64, 64)])
    bits = torch.randint(0, 2, (1, 4, 4, 4, 64), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    with torch.no_grad():
        a = bit_logprobs(default.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64), bits)
        trainer.set_rope_table_rounding(torch.bfloat16)
        b = bit_logprobs(trainer.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64), bits)
    assert not torch.equal(a, b)  # the rounding is visible in the scores (hence an explicit option)


def _patches(n_images: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_images * 16, 3 * 2 * 16 * 16, generator=g) * 2 - 1


def test_vision_attention_is_per_image():
    """Two images encoded together give each image's bits/features as if encoded alone (no cross-image attention)."""
    vis = build_tiny_policy(seed=1).model.visual
    grid = torch.tensor([[1, 4, 4]])
    a, b = _patches(1, 5), _patches(1, 6)
    with torch.no_grad():
        both = vis.encode_bits(torch.cat([a, b]), torch.cat([grid, grid]))
        alone = torch.cat([vis.encode_bits(a, grid), vis.encode_bits(b, grid)])
        feats_both = vis(torch.cat([a, b]), torch.cat([grid, grid]))[0]
        feats_alone = torch.cat([vis(a, grid)[0], vis(b, grid)[0]])
    assert both.shape == (8, 4, 4, 64) and both.dtype == torch.uint8
    assert torch.equal(both, alone)
    torch.testing.assert_close(feats_both, feats_alone, rtol=0, atol=1e-6)


def test_legacy_index_codec_reproduces_the_reference_detour():
    """§3.2: the reference's eval-mode encoder goes bits -> int64 index -> bits. Ordinary codes are unchanged; the
    all-zero code comes back with the MSB set. ``legacy_index_codec=True`` reproduces it, the default does not."""
    vis = build_tiny_policy(seed=2).model.visual
    grid = torch.tensor([[1, 4, 4]])
    x = _patches(1, 7)
    with torch.no_grad():
        plain = vis.encode_bits(x, grid)
        assert torch.equal(vis.encode_bits(x, grid, legacy_index_codec=True), B.legacy_roundtrip(plain))
        # force every main-level sub-patch to the all-zero code (z = -1 everywhere)
        fc2 = vis.bsq_input_proj.linear_fc2
        fc2.weight.zero_()
        fc2.bias.fill_(-1.0)
        zero = vis.encode_bits(x, grid)
        legacy = vis.encode_bits(x, grid, legacy_index_codec=True)
        assert (zero[:, 0] == 0).all()
        assert (legacy[:, 0, :, 0] == 1).all() and (legacy[:, 0, :, 1:] == 0).all()
        assert torch.equal(legacy[:, 1:], zero[:, 1:])  # other levels: ordinary codes, unchanged
        legacy_feats = vis(x, grid, legacy_index_codec=True)[0]
        assert torch.equal(legacy_feats, vis.bits_to_features(legacy)[0])
        assert not torch.equal(legacy_feats, vis(x, grid)[0])


def test_reference_written_config_and_buffers_load_strictly(tmp_path):
    """A folder as the reference's save_pretrained writes it (HF bookkeeping keys, generation_config.json, the int64
    bsq buffers) loads strictly and scores like the original."""
    # its own policy: the session's tiny_policy may have had its projections fused by an engine built over it,
    # which changes the last bit of the sums
    tiny_policy = build_tiny_policy(seed=0)
    folder = tmp_path / "ar_model"
    tiny_policy.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update({"architectures": ["UniARForConditionalGeneration"], "dtype": "float32",
                "transformers_version": "4.57.1"})
    raw["text_config"]["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "generation_config.json").write_text(json.dumps({"transformers_version": "4.57.1"}))
    loaded = UniARPolicy.from_pretrained(tmp_path)
    basis = loaded.model.visual.bsq.basis
    assert basis.dtype == torch.int64 and basis[0].item() == -(2**63) and basis[-1].item() == 1
    tp = tokenize(loaded.tokenizer, [generation_text("a red cat", 64, 64)])
    bits = torch.randint(0, 2, (1, 4, 4, 4, 64), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    with torch.no_grad():
        a = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64)
        b = loaded.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64)
    assert torch.equal(a, b)
