"""UniAR's vision tower: the Qwen3-VL ViT, the BSQ bottleneck per level, mergers, and bits -> features (§3.1-3.3).

``bits_to_features`` is the path the generator and the RL scorer use; ``forward`` encodes pixels for edit mode.
Module names match the published ``model.visual.*`` / ``bsq_encoder`` state dicts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..bits import legacy_roundtrip
from .configuration import VisionConfig
from .layers import keep_fp32_table


def _act(name: str):
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name in ("gelu", "gelu_exact"):
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unsupported vision hidden_act {name!r}")


class Merger(nn.Module):
    """LayerNorm -> Linear -> GELU(erf) -> Linear over groups of ``merge_unit`` rows.

    post_norm=False: LayerNorm per row before grouping (the main merger, and the BSQ projections with unit 1);
    post_norm=True: LayerNorm over the concatenated group (deepstack mergers).
    """

    def __init__(self, in_dim: int, out_dim: int, merge_unit: int, post_norm: bool, mid_dim: int | None = None):
        super().__init__()
        self.group = in_dim * merge_unit
        self.post_norm = post_norm
        self.norm = nn.LayerNorm(self.group if post_norm else in_dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.group, mid_dim or self.group)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(mid_dim or self.group, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.group)) if self.post_norm else self.norm(x).reshape(-1, self.group)
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class BSQBuffers(nn.Module):
    """The ``bsq.basis`` / ``bsq.group_basis`` int64 buffers of the published state dict (powers of two; for
    D = 64 entry 0 wraps to -2^63). Only the legacy index codec reads them (see ``uniar_ray.bits``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("basis", 2 ** torch.arange(dim - 1, -1, -1, dtype=torch.int64))
        self.register_buffer("group_basis", torch.ones(1, dtype=torch.int64))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, sizes):
        x = x + self.attn(self.norm1(x), cos, sin, sizes)
        return x + self.mlp(self.norm2(x))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act_fn = _act(cfg.hidden_act)

    def forward(self, x):
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class VisionAttention(nn.Module):
    """Bidirectional attention within each image, 2-D rotary applied in fp32.

    Each image (``sizes``: patch rows per image, in order) is attended separately with an unmasked 4-D
    ``scaled_dot_product_attention`` call, as transformers 4.57 does for every non-flash backend. Besides skipping the
    block-diagonal mask's wasted work, this picks the same CPU kernel as the reference: a 3-D call with a mask gives
    different bf16 rounding (ViT outputs off by ~1 ulp, enough to flip the sign of near-zero BSQ inputs).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.impl = "sdpa"  # UniARPolicy.set_attn_impl switches it with the text layers

    def forward(self, x, cos, sin, sizes: list[int]):
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        dtype = q.dtype
        c, s = cos[:, None].float(), sin[:, None].float()
        q = (q.float() * c + _rotate_half(q.float()) * s).to(dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, n, head_dim]
        attend = _eager_attention if self.impl == "eager" else F.scaled_dot_product_attention
        outs = [attend(qi, ki, vi) for qi, ki, vi in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))]
        out = torch.cat(outs, dim=2)[0]  # [heads, n, head_dim]
        return self.proj(out.transpose(0, 1).reshape(n, -1))


def _eager_attention(q, k, v):
    """transformers' eager attention, rounding included (scores * scale, fp32 softmax cast back): the reference's
    chat.py runs the vision tower with it on CPU."""
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionModel(nn.Module):
    """``model.visual``: ViT blocks, BSQ projections per level, merger and deepstack mergers."""

    def __init__(self, cfg: VisionConfig, out_hidden_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        hv, out = cfg.hidden_size, out_hidden_size or cfg.out_hidden_size
        unit = cfg.merge_unit
        self.patch_embed = nn.Module()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed.proj = nn.Conv3d(cfg.in_channels, hv, kernel_size=k, stride=k, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, hv)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = Merger(hv, out, unit, post_norm=not cfg.bsq_skip_final_layernorm)
        self.deepstack_merger_list = nn.ModuleList(
            [Merger(hv, out, unit, post_norm=True) for _ in cfg.deepstack_visual_indexes]
        )
        if not cfg.use_bsq:
            raise ValueError("UniAR needs vision_config.use_bsq=true (generation predicts BSQ bits)")
        self.bsq = BSQBuffers(cfg.bsq_dim)
        for name in self.level_names("input"):
            setattr(self, name, Merger(hv, cfg.bsq_dim, 1, post_norm=True, mid_dim=cfg.bsq_hidden_dim))
        for name in self.level_names("output"):
            setattr(self, name, Merger(cfg.bsq_dim, hv, 1, post_norm=True, mid_dim=cfg.bsq_hidden_dim))
        self.table_rounding: torch.dtype | None = None
        self.rebuild_buffers(None)

    def rebuild_buffers(self, device) -> None:
        """The 2-D rotary table (not stored in checkpoints); fp32 unless ``table_rounding`` (see ``layers.MRoPE``)."""
        dim = self.cfg.hidden_size // self.cfg.num_heads // 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        if self.table_rounding is not None:
            inv = inv.to(self.table_rounding).float()
        self.register_buffer("rotary_inv_freq", inv, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_fp32_table(self, "rotary_inv_freq")  # stays fp32 under .to(bf16), like the text rotary table
        return self

    def level_names(self, kind: str) -> list[str]:
        """Module names of the BSQ projections, level order: main, then deepstack levels (§3.3)."""
        base = f"bsq_{kind}_proj"
        return [base] + [f"{base}_list_{j}" for j in range(len(self.cfg.deepstack_visual_indexes))]

    # ------------------------------------------------------------------------------------------------------------
    # bits -> features (generation input, RL scorer, decoder)
    # ------------------------------------------------------------------------------------------------------------

    def level_features(self, bits: torch.Tensor, deepstack_norm: bool = True) -> list[torch.Tensor]:
        """bits [..., L, U, D] in {0, 1} -> per level OutProj((2b - 1)/sqrt(D)), each [M*U, Hv] (no merger).

        deepstack_norm: apply ``merger.norm`` to deepstack levels when ``bsq_skip_final_layernorm`` (the AR
        input path, and the decoder with ``inference_skip_final_layernorm=False``).
        """
        cfg = self.cfg
        dtype = getattr(self, self.level_names("output")[0]).linear_fc2.weight.dtype  # works on a pruned copy too
        bits = bits.reshape(-1, cfg.num_levels, cfg.merge_unit, cfg.bsq_dim)
        codes = (bits.to(dtype) * 2 - 1) / math.sqrt(cfg.bsq_dim)
        feats = []
        for level, name in enumerate(self.level_names("output")):
            f = getattr(self, name)(codes[:, level])
            if level > 0 and deepstack_norm and cfg.bsq_skip_final_layernorm:
                f = self.merger.norm(f)
            feats.append(f)
        return feats

    def bits_to_features(self, bits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """bits [..., L, U, D] -> (e_main [M, H_llm], [e_ds0, e_ds1, ...] each [M, H_llm]) for the backbone."""
        feats = self.level_features(bits)
        main = self.merger(feats[0])
        deep = [m(f) for m, f in zip(self.deepstack_merger_list, feats[1:])]
        return main, deep

    # ------------------------------------------------------------------------------------------------------------
    # pixels -> features (edit mode)
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor,
                legacy_index_codec: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """patches [n, C*T*P*P] in merge-window order, grid_thw [I, 3] -> merged features like ``bits_to_features``.

        Images pass the BSQ bottleneck (quantise to bits, decode), so the backbone sees the same discrete features
        it generates. Returns the bits too via ``encode_bits`` when needed (see there for ``legacy_index_codec``).
        """
        bits = self.encode_bits(patches, grid_thw, legacy_index_codec=legacy_index_codec)
        return self.bits_to_features(bits)

    def encode_bits(self, patches: torch.Tensor, grid_thw: torch.Tensor, legacy_index_codec: bool = False) -> torch.Tensor:
        """patches -> bits [M, L, U, D] (uint8) of every merged token of every image, in order.

        legacy_index_codec: pass each sub-patch's bits through the reference's bits -> int64 index -> bits detour
        (its eval-mode encoder does this, spec §3.2), quirk included: the all-zero code comes back with the MSB set
        and the MSB-only code comes back as all zeros. Every other code is unchanged. Only for bit-exact parity with
        the reference; the default keeps the quantiser's bits.
        """
        cfg = self.cfg
        dtype = self.patch_embed.proj.weight.dtype
        p = cfg.patch_size
        x = patches.to(dtype).view(-1, cfg.in_channels, cfg.temporal_patch_size, p, p)
        h = self.patch_embed.proj(x).view(x.shape[0], -1)
        h = h + self._pos_embed(grid_thw).to(h.dtype)
        cos, sin = self._rotary(grid_thw)
        sizes = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        raw = []
        for i, blk in enumerate(self.blocks):
            h = blk(h, cos, sin, sizes)
            if i in cfg.deepstack_visual_indexes:
                raw.append(h)
        levels = [h] + raw
        bits = []
        for name, x_l in zip(self.level_names("input"), levels):
            z = getattr(self, name)(x_l)
            bits.append((z > 0).to(torch.uint8))  # sign of z == sign of z/|z|; zero -> bit 0 (code -1)
        out = torch.stack(bits, dim=1).view(-1, cfg.merge_unit, cfg.num_levels, cfg.bsq_dim).transpose(1, 2)
        if legacy_index_codec:
            out = legacy_roundtrip(out)
        return out

    def _rotary(self, grid_thw):
        m = self.cfg.spatial_merge_size
        coords = []
        for t, gh, gw in grid_thw.tolist():
            rows = torch.arange(gh).view(gh // m, 1, m, 1).expand(gh // m, gw // m, m, m)
            cols = torch.arange(gw).view(1, gw // m, 1, m).expand(gh // m, gw // m, m, m)
            rc = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)
            coords.append(rc.repeat(t, 1))
        coords = torch.cat(coords).to(self.rotary_inv_freq.device)
        # With table_rounding (a model cast by .to(bf16), as the reference's chat.py and GRPO trainer do) transformers
        # builds the position x frequency table, and cos/sin of it, in that dtype too: so do we.
        dt = self.table_rounding or torch.float32
        freqs = coords[..., None].to(dt) * self.rotary_inv_freq.to(dt)  # [n, 2, dim/4]
        emb = freqs.flatten(1)
        emb = torch.cat((emb, emb), dim=-1)
        return emb.cos(), emb.sin()

    def _pos_embed(self, grid_thw):
        """Bilinear interpolation of the learned square grid to each image's patch grid, in merge-window order."""
        side = int(self.cfg.num_position_embeddings**0.5)
        m = self.cfg.spatial_merge_size
        weight = self.pos_embed.weight
        out = []
        for t, gh, gw in grid_thw.tolist():
            hi = torch.linspace(0, side - 1, gh)
            wi = torch.linspace(0, side - 1, gw)
            h0, w0 = hi.int(), wi.int()
            h1, w1 = (h0 + 1).clip(max=side - 1), (w0 + 1).clip(max=side - 1)
            dh, dw = (hi - h0)[:, None], (wi - w0)[None, :]
            corners = [(h0, w0, (1 - dh) * (1 - dw)), (h0, w1, (1 - dh) * dw), (h1, w0, dh * (1 - dw)), (h1, w1, dh * dw)]
            pe = 0
            for hh, ww, wt in corners:
                idx = (hh[:, None] * side + ww[None, :]).flatten().to(weight.device)
                pe = pe + weight[idx] * wt.flatten()[:, None].to(weight.dtype).to(weight.device)
            pe = pe.repeat(t, 1).view(t, gh // m, m, gw // m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, weight.shape[1])
            out.append(pe)
        return torch.cat(out)
