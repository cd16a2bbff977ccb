"""UniARPolicy: config round trip, strict loading, padding invariance, dtypes, prompt construction."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniar_ray.model import CheckpointMismatch, UniARConfig, UniARPolicy, generation_text, tokenize


def _inputs(policy, prompts, h=64, w=64, seed=0):
    tp = tokenize(policy.tokenizer, [generation_text(p, h, w) for p in prompts])
    g = torch.Generator().manual_seed(seed)
    n = (h // 32) * (w // 32)
    bits = torch.randint(0, 2, (len(prompts), n, 4, 4, 64), generator=g, dtype=torch.uint8)
    return tp, bits


def test_config_round_trip(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "ar_model" / "config.json").read_text())
    cfg = UniARConfig.from_dict(raw)
    assert cfg.to_dict() == raw
    assert raw["model_type"] == "uniar" and raw["vision_config"]["model_type"] == "uniar_vision"
    for key in ("vistok_pred", "vistok_pred_layernorm", "vistok_pred_use_mlp", "visual_transformer_decoder",
                "visual_transformer_decoder_depth", "image_token_id", "vision_start_token_id"):
        assert key in raw
    for key in ("bsq_dim", "bsq_hidden_dim", "bsq_skip_final_layernorm", "deepstack_visual_indexes", "use_bsq"):
        assert key in raw["vision_config"]


def test_unknown_config_fields_survive(tmp_path, tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "ar_model" / "config.json").read_text())
    raw["architectures"] = ["UniARForConditionalGeneration"]
    raw["text_config"]["some_future_field"] = 3
    cfg = UniARConfig.from_dict(raw)
    assert cfg.to_dict()["architectures"] == ["UniARForConditionalGeneration"]
    assert cfg.to_dict()["text_config"]["some_future_field"] == 3


def test_load_root_and_ar_model_layouts_give_same_logits(tiny_checkpoint, tiny_policy):
    tp, bits = _inputs(tiny_policy, ["a red cat"])
    ref = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64)
    for path in (tiny_checkpoint, tiny_checkpoint / "ar_model"):
        p = UniARPolicy.from_pretrained(path)
        assert torch.equal(p.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64), ref)


def test_state_dict_names_match_published_layout(tiny_policy):
    keys = set(tiny_policy.state_dict())
    for k in ("model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_norm.weight",
              "model.language_model.norm.weight", "lm_head.weight", "model.visual.patch_embed.proj.weight",
              "model.visual.pos_embed.weight", "model.visual.blocks.0.attn.qkv.weight",
              "model.visual.merger.norm.weight", "model.visual.deepstack_merger_list.2.linear_fc2.bias",
              "model.visual.bsq.basis", "model.visual.bsq.group_basis", "model.visual.bsq_input_proj.linear_fc1.weight",
              "model.visual.bsq_output_proj_list_2.norm.weight", "output_layer_vistok.0.weight",
              "output_layer_vistok.1.weight", "visual_decoder.1.mlp.down_proj.weight"):
        assert k in keys, k
    assert tiny_policy.state_dict()["output_layer_vistok.1.weight"].shape == (2048, 64)
    assert tiny_policy.state_dict()["model.visual.bsq.basis"][0] == -(2**63)  # the published int64 wrap


def _copy_ckpt(src, dst, edit):
    (dst / "ar_model").mkdir(parents=True)
    for f in (src / "ar_model").iterdir():
        (dst / "ar_model" / f.name).write_bytes(f.read_bytes())
    st = load_file(dst / "ar_model" / "model.safetensors")
    edit(st)
    save_file(st, dst / "ar_model" / "model.safetensors")
    return dst


def test_wrong_shape_missing_and_unexpected_are_listed(tmp_path, tiny_checkpoint):
    def edit(st):
        st["visual_decoder.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
        del st["lm_head.weight"]
        st["extra.head.weight"] = torch.zeros(1)

    bad = _copy_ckpt(tiny_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatch) as e:
        UniARPolicy.from_pretrained(bad)
    msg = str(e.value)
    assert "visual_decoder.0.mlp.up_proj.weight: file (3, 3) vs model (128, 64)" in msg
    assert "missing (1): lm_head.weight" in msg and "unexpected (1): extra.head.weight" in msg


def test_missing_bsq_buffers_are_regenerated(tmp_path, tiny_checkpoint):
    def edit(st):
        del st["model.visual.bsq.basis"], st["model.visual.bsq.group_basis"]

    ok = _copy_ckpt(tiny_checkpoint, tmp_path / "nobuf", edit)
    p = UniARPolicy.from_pretrained(ok)
    assert p.model.visual.bsq.basis[-1] == 1 and p.model.visual.bsq.basis[0] == -(2**63)


def test_left_padding_does_not_change_logits(tiny_policy):
    prompts = ["a photo of a red cat", "dog"]
    tp, bits = _inputs(tiny_policy, prompts, 64, 128)
    assert tp.attention_mask[1].sum() < tp.attention_mask.shape[1]  # row 1 is padded
    batch = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 128)
    single, _ = _inputs(tiny_policy, prompts[1:], 64, 128)
    alone = tiny_policy.bit_logits(single.input_ids, single.attention_mask, bits[1:], 64, 128)
    assert (batch[1:] - alone).abs().max() < 1e-5


def test_causality_logits_at_n_ignore_later_bits(tiny_policy):
    tp, bits = _inputs(tiny_policy, ["a cat"], 128, 128)
    other = bits.clone()
    other[:, 7:] ^= 1
    a = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 128, 128)
    b = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, other, 128, 128)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # position n sees bits of tokens < n only
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_bfloat16_and_float32_agree(tiny_checkpoint):
    p32 = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    p16 = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    tp, bits = _inputs(p32, ["a red cat", "two dogs"])
    lp32 = torch.log_softmax(p32.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64).float(), -1)
    lp16 = torch.log_softmax(p16.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64).float(), -1)
    assert p16.dtype == torch.bfloat16
    assert torch.isfinite(lp16).all()
    assert (lp32 - lp16).abs().mean() < 0.05


def test_eager_and_sdpa_attention_agree(tiny_policy):
    tp, bits = _inputs(tiny_policy, ["a red cat", "dog"])
    a = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64)
    tiny_policy.set_attn_impl("eager")
    try:
        b = tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64)
    finally:
        tiny_policy.set_attn_impl("sdpa")
    assert (a - b).abs().max() < 1e-5


def test_prompt_text_matches_reference_template():
    text = generation_text("a cat", 512, 768)
    assert text == ("<|im_start|>user\na cat<image_gen> generate image 16 24<|im_end|>\n"
                    "<|im_start|>assistant\n<|vision_start|>")
    with pytest.raises(ValueError, match="height=500 is not a positive multiple of 32"):
        generation_text("a cat", 500, 512)


def test_bad_bits_shape_is_a_clear_error(tiny_policy):
    tp, bits = _inputs(tiny_policy, ["a cat"])
    with pytest.raises(ValueError, match=r"bits have shape \(1, 4, 4, 4, 64\), expected \(1, 16, 4, 4, 64\)"):
        tiny_policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 128, 128)


@pytest.mark.parametrize("variant,keys", [
    ("plain", {"output_layer_vistok.weight"}),
    ("layernorm", {"output_layer_vistok.0.weight", "output_layer_vistok.1.weight"}),
    ("mlp", {"output_layer_vistok.0.weight", "output_layer_vistok.1.weight", "output_layer_vistok.3.weight"}),
])
def test_all_three_head_variants_save_and_load(tmp_path, variant, keys):
    from uniar_ray.model import build_tiny_policy, tiny_config

    cfg = tiny_config()
    cfg.vistok_pred_layernorm = variant == "layernorm"
    cfg.vistok_pred_use_mlp = variant == "mlp"
    policy = build_tiny_policy(1, cfg)
    head = {k for k in policy.state_dict() if k.startswith("output_layer_vistok")}
    assert head == keys
    policy.save_pretrained(tmp_path / "v")
    again = UniARPolicy.from_pretrained(tmp_path / "v")
    tp, bits = _inputs(policy, ["a cat"])
    assert torch.equal(policy.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64),
                       again.bit_logits(tp.input_ids, tp.attention_mask, bits, 64, 64))
