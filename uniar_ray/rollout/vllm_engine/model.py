"""UniAR as a vLLM model: Qwen3 backbone + visual-decoder stack, both with paged KV, fed by sampled bits.

Built by vLLM from the view folder that ``engine.py`` writes (``architectures: [UniARForImageGeneration]``); the
runner (``runner.py``) passes every token's 3-D M-RoPE position, each image token's bits and the input image's
features (edit mode) through ``forward``'s extra kwargs.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from uniar_ray.model.configuration import UniARConfig
from uniar_ray.model.layers import MRoPE, RMSNorm, rotate_half
from uniar_ray.model.policy import build_vistok_head
from uniar_ray.model.vision import VisionModel

# Checkpoint tensors the image path never reads (the text head and the backbone's final norm: spec §3.4; the BSQ
# index-codec constants). The ViT encoder and the BSQ input side are loaded: edit requests pass their input image
# through them.
_UNUSED = re.compile(r"^(lm_head\.|model\.language_model\.norm\.|model\.visual\.bsq\.)")
_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
            ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


@dataclasses.dataclass
class ImageTokens:
    """Per-step inputs built by the runner (rows in flat token order over the scheduled tokens)."""

    positions: torch.Tensor  # [3, T] long: (t, h, w) M-RoPE positions of every scheduled token
    index: torch.Tensor  # [M] long: flat indices of generated image tokens
    bits: torch.Tensor  # [M, L, U, D] uint8: the bits sampled for those tokens (fed back as inputs)
    in_index: torch.Tensor  # [M'] long: flat indices of input-image tokens (edit prompts)
    in_main: torch.Tensor | None  # [M', H]: the input image's features at those tokens
    in_deep: list[torch.Tensor]  # each [M', H]: its deepstack features


class _Layer(nn.Module):
    """A Qwen3 decoder layer on vLLM's fused linears and paged ``Attention`` (rotary applied here, M-RoPE)."""

    def __init__(self, tc, cache_config, quant_config, prefix: str):
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                       RowParallelLinear)

        super().__init__()
        self.nh, self.nkv, self.hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
        h, i = tc.hidden_size, tc.intermediate_size
        self.self_attn = nn.Module()
        a = self.self_attn
        a.qkv_proj = QKVParallelLinear(h, self.hd, self.nh, self.nkv, bias=tc.attention_bias,
                                       quant_config=quant_config, prefix=f"{prefix}.self_attn.qkv_proj")
        a.o_proj = RowParallelLinear(self.nh * self.hd, h, bias=tc.attention_bias, quant_config=quant_config,
                                     prefix=f"{prefix}.self_attn.o_proj")
        a.q_norm = RMSNorm(self.hd, tc.rms_norm_eps)
        a.k_norm = RMSNorm(self.hd, tc.rms_norm_eps)
        a.attn = Attention(self.nh, self.hd, self.hd**-0.5, num_kv_heads=self.nkv, cache_config=cache_config,
                           quant_config=quant_config, prefix=f"{prefix}.self_attn.attn")
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = MergedColumnParallelLinear(h, [i, i], bias=False, quant_config=quant_config,
                                                           prefix=f"{prefix}.mlp.gate_up_proj")
        self.mlp.down_proj = RowParallelLinear(i, h, bias=False, quant_config=quant_config,
                                               prefix=f"{prefix}.mlp.down_proj")
        self.input_layernorm = RMSNorm(h, tc.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, tc.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H]; cos/sin [T, 1, hd]."""
        a, t = self.self_attn, x.shape[0]
        qkv, _ = a.qkv_proj(self.input_layernorm(x))
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = a.q_norm(q.reshape(t, self.nh, self.hd))
        k = a.k_norm(k.reshape(t, self.nkv, self.hd))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o, _ = a.o_proj(a.attn(q.reshape(t, -1), k.reshape(t, -1), v.contiguous()))
        x = x + o
        gate_up, _ = self.mlp.gate_up_proj(self.post_attention_layernorm(x))
        g, u = gate_up.chunk(2, dim=-1)
        out, _ = self.mlp.down_proj(F.silu(g) * u)
        return x + out


class UniARForImageGeneration(nn.Module):
    """Parameter paths follow the published ``ar_model`` except the visual-decoder stack, which lives at
    ``vis_stack.<n_llm + j>`` so each attention layer name carries one unique integer (vLLM orders KV caches by it).
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        cfg = UniARConfig.from_dict(vllm_config.model_config.hf_config.uniar)
        self.config, tc = cfg, cfg.text_config
        cache, quant = vllm_config.cache_config, vllm_config.quant_config
        self.n_llm = tc.num_hidden_layers
        self.model = nn.Module()
        lm = self.model.language_model = nn.Module()
        lm.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size)
        lm.layers = nn.ModuleList(
            [_Layer(tc, cache, quant, f"model.language_model.layers.{i}") for i in range(self.n_llm)])
        self.vis_stack = nn.ModuleDict({str(self.n_llm + j): _Layer(tc, cache, quant, f"vis_stack.{self.n_llm + j}")
                                        for j in range(cfg.visual_transformer_decoder_depth)})
        self.model.visual = VisionModel(cfg.vision_config, out_hidden_size=tc.hidden_size)
        self.output_layer_vistok = build_vistok_head(cfg)
        self.rotary = MRoPE(tc.head_dim, tc.rope_theta, tc.mrope_section)
        v = cfg.vision_config
        self.bits_shape = (v.num_levels, v.merge_unit, v.bsq_dim)  # (L, U, D)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, uniar_images: ImageTokens | None = None,
                **_: object) -> torch.Tensor:
        """-> visual-stack output [T, H] (pre-head); image tokens take bits -> features and deepstack adds."""
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        pos3 = positions.view(1, -1).expand(3, -1)  # vLLM's warm-up runs: the same running index on t, h, w
        index, deep = None, []
        img = uniar_images
        if img is not None:
            pos3 = img.positions.to(x.device)
            index, main, deep = self._visual_inputs(img)
            if index is not None:
                x = x.index_copy(0, index, main.to(x.dtype))
        cos, sin = self.rotary(pos3[:, None], x.dtype)
        cos, sin = cos[0, :, None], sin[0, :, None]
        for i, layer in enumerate(self.model.language_model.layers):
            x = layer(x, cos, sin)
            if i < len(deep):
                x = x.index_add(0, index, deep[i].to(x.dtype))
        for layer in self.vis_stack.values():  # runs on every token, so its paged KV covers the prompt too
            x = layer(x, cos, sin)
        return x

    def _visual_inputs(self, img: ImageTokens):
        """-> (flat indices, main features, deepstack features) of every visual token: generated image tokens
        (bits -> features) and input-image tokens (the ViT's features, computed once per request by the runner)."""
        parts = []
        if img.index.numel():
            main, deep = self.model.visual.bits_to_features(img.bits)
            parts.append((img.index, main, deep))
        if img.in_index.numel():
            parts.append((img.in_index, img.in_main, img.in_deep))
        if not parts:
            return None, None, []
        index = torch.cat([p[0] for p in parts])
        main = torch.cat([p[1] for p in parts])
        deep = [torch.cat([p[2][j] for p in parts]) for j in range(len(parts[0][2]))]
        return index, main, deep

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[rows, H] -> bit logits [rows, L*U*D*2] (view as [rows, L, U, D, 2]); not vocabulary logits."""
        return self.output_layer_vistok(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Published ``ar_model`` names -> this module (q/k/v and gate/up stacked; unused tensors skipped)."""
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if _UNUSED.match(name):
                continue
            name = re.sub(r"^visual_decoder\.(\d+)\.", lambda m: f"vis_stack.{self.n_llm + int(m.group(1))}.", name)
            for fused, part, shard in _STACKED:
                if f".{part}." in name:
                    target = name.replace(f".{part}.", f".{fused}.")
                    params[_known(target, params)].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                param = params[_known(name, params)]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


def _known(name: str, params: dict) -> str:
    if name not in params:
        raise KeyError(f"UniAR vLLM model: checkpoint tensor {name!r} has no parameter here (config mismatch?)")
    return name
