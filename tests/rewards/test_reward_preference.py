"""HPS v2.1 / PickScore on transformers CLIP: the open_clip -> transformers key mapping, checked on a synthetic
open_clip-style state dict against a direct open_clip-style forward written here, and the two scores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from rewards.base import RewardBatch
from rewards.clip import encode_images, encode_texts, normalize
from rewards.preference import PreferenceReward, convert_open_clip_state_dict, load_open_clip_checkpoint, load_strict

WIDTH_T, WIDTH_V, LAYERS, HEADS, EMBED, VOCAB, CTX, PATCH, IMG = 32, 48, 2, 4, 24, 50, 16, 8, 32


def tiny_config() -> CLIPConfig:
    text = dict(vocab_size=VOCAB, hidden_size=WIDTH_T, intermediate_size=4 * WIDTH_T, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=CTX, hidden_act="gelu", eos_token_id=VOCAB - 1,
                bos_token_id=VOCAB - 2, pad_token_id=0)
    vision = dict(hidden_size=WIDTH_V, intermediate_size=4 * WIDTH_V, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH, hidden_act="gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


def open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under open_clip's names and shapes (ViT image tower, standard text tower)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"token_embedding.weight": r(VOCAB, WIDTH_T), "positional_embedding": r(CTX, WIDTH_T),
          "ln_final.weight": 1 + r(WIDTH_T), "ln_final.bias": r(WIDTH_T), "text_projection": r(WIDTH_T, EMBED),
          "logit_scale": torch.tensor(math.log(1 / 0.07)),
          "visual.class_embedding": r(WIDTH_V), "visual.positional_embedding": r((IMG // PATCH) ** 2 + 1, WIDTH_V),
          "visual.conv1.weight": r(WIDTH_V, 3, PATCH, PATCH), "visual.ln_pre.weight": 1 + r(WIDTH_V),
          "visual.ln_pre.bias": r(WIDTH_V), "visual.ln_post.weight": 1 + r(WIDTH_V), "visual.ln_post.bias": r(WIDTH_V),
          "visual.proj": r(WIDTH_V, EMBED), "attn_mask": torch.full((CTX, CTX), float("-inf")).triu(1)}
    for prefix, w in (("transformer", WIDTH_T), ("visual.transformer", WIDTH_V)):
        for i in range(LAYERS):
            p = f"{prefix}.resblocks.{i}"
            sd.update({f"{p}.ln_1.weight": 1 + r(w), f"{p}.ln_1.bias": r(w), f"{p}.ln_2.weight": 1 + r(w),
                       f"{p}.ln_2.bias": r(w), f"{p}.attn.in_proj_weight": r(3 * w, w),
                       f"{p}.attn.in_proj_bias": r(3 * w), f"{p}.attn.out_proj.weight": r(w, w),
                       f"{p}.attn.out_proj.bias": r(w), f"{p}.mlp.c_fc.weight": r(4 * w, w),
                       f"{p}.mlp.c_fc.bias": r(4 * w), f"{p}.mlp.c_proj.weight": r(w, 4 * w),
                       f"{p}.mlp.c_proj.bias": r(w)})
    return sd


def _block(x, sd, p, mask):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)); nn.MultiheadAttention maths."""
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
    q, k, v = (h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, w // HEADS).transpose(1, 2)  # noqa: E731
    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // HEADS)
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
    x = x + o @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
    h = F.gelu(h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"])
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def reference_image_features(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH_V,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(LAYERS):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", None)
    x = F.layer_norm(x[:, 0], (WIDTH_V,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


def reference_text_features(sd, ids, eos_pos):
    """Causal text tower pooled at the end-of-text token (open_clip takes argmax(ids), which is the end token in
    CLIP's real vocabulary, 49407 being the largest id)."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = _block(x, sd, f"transformer.resblocks.{i}", mask)
    x = F.layer_norm(x, (WIDTH_T,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), eos_pos] @ sd["text_projection"]


def test_every_key_placed_with_its_shape_and_none_left_over():
    sd = open_clip_state()
    converted = convert_open_clip_state_dict({f"module.{k}": v for k, v in sd.items()})  # DDP prefix too
    target = CLIPModel(tiny_config()).state_dict()
    assert set(converted) == set(target)
    for k, v in converted.items():
        assert tuple(v.shape) == tuple(target[k].shape), k
    # q/k/v are the thirds of the fused projection, projections transposed.
    fused = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(converted["vision_model.encoder.layers.1.self_attn.k_proj.weight"], fused[WIDTH_V:2 * WIDTH_V])
    assert torch.equal(converted["text_projection.weight"], sd["text_projection"].T)
    with pytest.raises(KeyError, match="no transformers counterpart"):
        convert_open_clip_state_dict({**sd, "visual.attnpool.weight": torch.zeros(1)})


def test_converted_model_matches_open_clip_forward(tmp_path):
    sd = open_clip_state(1)
    model = CLIPModel(tiny_config()).eval()
    load_strict(model, convert_open_clip_state_dict(sd))
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, IMG, IMG)
    ids = torch.randint(1, VOCAB - 2, (3, CTX))
    eos = torch.tensor([5, CTX - 1, 9])
    ids[torch.arange(3), eos] = VOCAB - 1
    ids[0, 6:], ids[2, 10:] = 0, 0  # padding after the end token (causal: it cannot change the pooled token)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        torch.testing.assert_close(img, reference_image_features(sd, pixels), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(txt, reference_text_features(sd, ids, eos), rtol=1e-4, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # The checkpoint file path: {"state_dict": ...} read with weights_only.
    torch.save({"state_dict": sd}, tmp_path / "hps.pt")
    again = load_open_clip_checkpoint(str(tmp_path / "hps.pt"))
    assert all(torch.equal(again[k], v) for k, v in convert_open_clip_state_dict(sd).items())


def test_load_strict_fails_loudly():
    model = CLIPModel(tiny_config())
    state = convert_open_clip_state_dict(open_clip_state())
    with pytest.raises(KeyError, match="missing"):
        load_strict(model, {k: v for k, v in state.items() if "layers.0" not in k})
    bad = dict(state)
    bad["visual_projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_strict(model, bad)


def test_hps_and_pickscore_scores(tiny_models):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a red cat", "a lighthouse " * 40, "two apples"]  # the long prompt is truncated to 77 tokens
    batch = RewardBatch(images, prompts, [None] * 3, [{}] * 3)
    hps = PreferenceReward.from_paths("hps", tiny_models["clip"], batch_size=2)
    out = hps.score(batch)
    clip = hps.clip
    cos = (normalize(encode_images(clip, images)) * normalize(encode_texts(clip, prompts))).sum(-1).numpy()
    np.testing.assert_allclose(out.scores, cos, rtol=1e-5, atol=1e-6)
    assert out.errors == [None] * 3 and (np.abs(out.scores) <= 1).all()
    pick = PreferenceReward.from_paths("pickscore", tiny_models["clip"]).score(batch)
    np.testing.assert_allclose(pick.scores, cos * clip.model.logit_scale.exp().item(), rtol=1e-5)


def test_hps_checkpoint_loaded_over_clip_folder(tiny_models, tmp_path):
    """An open_clip-layout checkpoint replaces every weight of the folder's CLIP."""
    folder_model = CLIPModel.from_pretrained(tiny_models["clip"])
    inverse = {}
    for k, v in folder_model.state_dict().items():  # write the folder's own weights back in open_clip layout, x 2
        inverse[k] = v * 2 if v.is_floating_point() else v
    sd = _to_open_clip(inverse, folder_model.config)
    torch.save(sd, tmp_path / "HPS_v2.1_compressed.pt")
    hps = PreferenceReward.from_paths("hps", tiny_models["clip"], checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    got = hps.clip.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in inverse.items())


def _to_open_clip(hf: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers -> open_clip names (the inverse mapping, written independently for the test)."""
    out = {}
    for k, v in hf.items():
        for tower, prefix in (("text_model.encoder.layers.", "transformer.resblocks."),
                              ("vision_model.encoder.layers.", "visual.transformer.resblocks.")):
            if k.startswith(tower):
                i, rest = k[len(tower):].split(".", 1)
                p = f"{prefix}{i}."
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    qkv = [hf[f"{tower}{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                    out[f"{p}attn.in_proj_{kind}"] = torch.cat(qkv)
                elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                    pass
                else:
                    for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                        rest = rest.replace(a, b)
                    out[p + rest] = v
                break
        else:
            simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                      "text_model.embeddings.position_embedding.weight": "positional_embedding",
                      "text_model.final_layer_norm.weight": "ln_final.weight",
                      "text_model.final_layer_norm.bias": "ln_final.bias", "logit_scale": "logit_scale",
                      "vision_model.embeddings.class_embedding": "visual.class_embedding",
                      "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                      "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                      "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                      "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                      "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                      "vision_model.post_layernorm.bias": "visual.ln_post.bias"}
            if k in simple:
                out[simple[k]] = v
            elif k == "text_projection.weight":
                out["text_projection"] = v.T
            elif k == "visual_projection.weight":
                out["visual.proj"] = v.T
            else:
                raise KeyError(k)
    return out
