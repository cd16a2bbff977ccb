"""Human-preference rewards on transformers CLIP: HPS v2.1 (spec §7.6) and PickScore. Every sample is scored.

HPS v2.1 ships as an open_clip ViT-H-14 state dict (``HPS_v2.1_compressed.pt``); ``convert_open_clip_state_dict``
maps it onto transformers' CLIP layout, so no open_clip is needed:

    PreferenceReward.from_paths("hps", "/ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                checkpoint="/ckpt/HPS_v2.1_compressed.pt")
    PreferenceReward.from_paths("pickscore", "/ckpt/PickScore_v1")   # a transformers CLIP folder with its processor
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np
import torch

from rewards.base import RewardBatch, RewardScores
from rewards.clip import Clip, encode_images, encode_texts, load_clip, normalize

# open_clip residual-block parameter -> transformers encoder-layer parameter (the fused qkv is split separately).
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
# Buffers open_clip may save that carry no weights (the causal mask is rebuilt by transformers).
_IGNORED = re.compile(r"(^|\.)attn_mask$")


def convert_open_clip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP (standard text tower, ViT image tower) -> transformers ``CLIPModel`` keys.

    Fused attention ``in_proj`` weights [3W, W] are split into q/k/v; open_clip's projections are used as
    ``x @ proj`` and become the transposed Linear weights. Raises on any key it does not know, so nothing is
    silently dropped; a ``module.`` prefix (DDP checkpoints) is stripped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        # open_clip's fused projection is nn.MultiheadAttention's in_proj_weight / in_proj_bias.
        key = re.sub(r"attn\.in_proj_(weight|bias)$", r"attn.in_proj.\1", key)
        if _IGNORED.search(key):
            continue
        mapped = _map_key(key, value)
        if mapped is None:
            unknown.append(key)
        else:
            out.update(mapped)
    if unknown:
        raise KeyError(f"open_clip keys with no transformers counterpart: {unknown[:10]}"
                       f"{' ...' if len(unknown) > 10 else ''}")
    return out


def _map_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    fixed = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    if key in fixed:
        return {fixed[key]: value}
    if key == "text_projection":
        return {"text_projection.weight": value.t().contiguous()}
    if key == "visual.proj":
        return {"visual_projection.weight": value.t().contiguous()}
    m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        return None
    tower = "vision_model" if m.group(1) else "text_model"
    prefix = f"{tower}.encoder.layers.{m.group(2)}"
    name, kind = m.group(3), m.group(4)
    if name == "attn.in_proj":
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}.self_attn.{p}_proj.{kind}": t.contiguous() for p, t in zip("qkv", (q, k, v))}
    if name in _BLOCK:
        return {f"{prefix}.{_BLOCK[name]}.{kind}": value}
    return None


def load_open_clip_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A ``.pt`` checkpoint holding an open_clip state dict (or ``{"state_dict": ...}``), read without executing
    code (``weights_only``), converted to transformers keys."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return convert_open_clip_state_dict(state)


class PreferenceReward:
    """``hps``: cosine similarity of the normalised image and prompt features (HPS v2.1's score, about 0.2-0.35
    for real images; no logit scale). ``pickscore``: the same times ``exp(logit_scale)`` (PickScore's score,
    about 20-23). Prompts are truncated to CLIP's 77 tokens."""

    tasks = None

    def __init__(self, kind: str, clip: Clip, batch_size: int = 16):
        if kind not in ("hps", "pickscore"):
            raise ValueError(f"unknown preference reward {kind!r}")
        self.name, self.kind, self.clip, self.batch_size = kind, kind, clip, batch_size

    @classmethod
    def from_paths(cls, kind: str, clip_path: str, checkpoint: str | None = None, device: str = "cpu",
                   dtype: str = "float32", batch_size: int = 16) -> PreferenceReward:
        """``clip_path``: a transformers CLIP folder (config, tokenizer, image processor, weights). ``checkpoint``:
        an open_clip state dict loaded over it, strictly (HPS v2.1 over CLIP-ViT-H-14-laion2B)."""
        model = None
        if checkpoint:
            from transformers import CLIPConfig, CLIPModel

            # The checkpoint holds every weight: build from the folder's config, then load strictly.
            model = CLIPModel(CLIPConfig.from_pretrained(clip_path))
            load_strict(model, load_open_clip_checkpoint(checkpoint))
        return cls(kind, load_clip(clip_path, device, dtype, model=model), batch_size)

    @torch.no_grad()
    def score(self, batch: RewardBatch) -> RewardScores:
        img = normalize(encode_images(self.clip, batch.images, self.batch_size))
        txt = normalize(encode_texts(self.clip, batch.prompts, self.batch_size))
        sim = (img * txt).sum(-1)
        if self.kind == "pickscore":
            sim = sim * self.clip.model.logit_scale.exp().float()
        scores = sim.cpu().numpy().astype(np.float64)
        errors = [None if math.isfinite(s) else "non-finite score" for s in scores]
        return RewardScores(scores, errors)


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load every parameter, fail on anything missing, unexpected or mis-shaped (never re-initialise silently)."""
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"shape mismatch: {bad[:5]}")
    result = model.load_state_dict(dict(state), strict=False)
    # transformers keeps position_ids as (non-persistent or persistent) buffers: not weights.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise KeyError(f"missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}")
