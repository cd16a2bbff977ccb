"""Qwen3 text-decoder building blocks with explicit masks and a preallocated KV cache.

Parameter names match transformers' Qwen3-VL text layers, so published weights load strictly. Used by the backbone
(``model.language_model``) and by UniAR's visual-decoder stack (``visual_decoder``), which has the same layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .configuration import TextConfig

ATTN_IMPLS = ("sdpa", "eager")


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in fp32, cast back, then scale (the order matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class MRoPE(nn.Module):
    """Interleaved multimodal rotary embedding (spec §3.4): positions (3, B, S) of (t, h, w) -> cos, sin.

    The inverse frequencies stay fp32 whatever ``.to(dtype)`` does to the module (see ``keep_fp32_table``), so a
    policy cast to bf16 in memory computes the same angles as one loaded with ``from_pretrained(dtype=bf16)`` and as
    the reference's inference path. ``table_rounding`` = torch.bfloat16 instead rounds them through bf16 like the
    reference's GRPO trainer, which casts the whole model with ``.to(torch.bfloat16)``, buffers included.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, list(mrope_section)
        self.table_rounding: torch.dtype | None = None
        self.rebuild_buffers(None)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_fp32_table(self, "inv_freq")
        return self

    def rebuild_buffers(self, device) -> None:
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
        if self.table_rounding is not None:
            inv_freq = inv_freq.to(self.table_rounding).float()
        # Which frequency index takes its angle from the h / w component (the rest use t).
        k = torch.arange(hd // 2, device=device)
        source = torch.zeros(hd // 2, dtype=torch.long, device=device)
        source[(k % 3 == 1) & (k < 3 * self.mrope_section[1])] = 1
        source[(k % 3 == 2) & (k < 3 * self.mrope_section[2])] = 2
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("source", source, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, B, S] (int) -> cos, sin [B, S, head_dim] in ``dtype`` (computed in fp32)."""
        pos = positions.float()  # [3, B, S]
        freqs = pos[..., None] * self.inv_freq.float()  # [3, B, S, hd/2]
        idx = self.source.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = torch.gather(freqs, 0, idx)[0]  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def keep_fp32_table(module: nn.Module, name: str) -> None:
    """After ``module._apply`` (``.to``, ``.bfloat16()``, ...): if the rotary table ``name`` was cast away from
    fp32, recompute it in fp32 on its device (casting back would keep the rounding)."""
    table = getattr(module, name, None)
    if table is not None and table.dtype != torch.float32:
        module.rebuild_buffers(table.device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values for a stack of layers: ``k[i], v[i]`` are [B, n_kv, max_len, head_dim].

    ``write(i, start, k, v)`` stores new entries in place (no per-step concatenation) and returns the views
    ``[:, :, :start + T]`` that attention reads.
    """

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: need {end} positions, allocated {self.max_len}")
        self.k[i][:, :, start:end] = k
        self.v[i][:, :, start:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (used when requests leave a running batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


def attention_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Causal + padding mask [B, 1, q_len, S] (True = may attend) for queries at the last ``q_len`` positions.

    key_valid: [B, S] bool, False at padding. Each query may always see itself, so rows of padding tokens stay
    finite (a fully masked row gives NaN in softmax, and NaN values leak through 0-weights into real rows).
    """
    s = key_valid.shape[1]
    q_pos = torch.arange(s - q_len, s, device=key_valid.device)[:, None]
    k_pos = torch.arange(s, device=key_valid.device)[None, :]
    causal = k_pos <= q_pos  # [T, S]
    mask = causal[None] & key_valid[:, None, :]
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


class Attention(nn.Module):
    """Qwen3 attention: per-head q/k RMSNorm, M-RoPE, grouped-query attention."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.impl = "sdpa"

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        """x [B, T, H]; cos/sin [B, T, hd]; mask [B, 1, T, S] bool with S = start + T (cache) or T."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        if self.impl == "sdpa":  # grouped-query attention without copying the (growing) K/V cache per head
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        else:
            rep = self.n_heads // self.n_kv
            out = _eager_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _eager_attention(q, k, v, mask):
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (``layers.k.*`` in the backbone, ``visual_decoder.k.*`` in the visual stack)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """The Qwen3 backbone (``model.language_model``) with deepstack injection after its first layers (§3.3)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = MRoPE(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.gradient_checkpointing = False  # see run_layer

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H]
        positions: torch.Tensor,  # [3, B, T]
        mask: torch.Tensor,  # [B, 1, T, S]
        visual_mask: torch.Tensor | None = None,  # [B, T] bool, positions that receive deepstack features
        deepstack: list[torch.Tensor] | None = None,  # each [n_visual, H], rows in (batch, position) order
        cache: KVCache | None = None,
        start: int = 0,
        final_norm: bool = False,  # the image path skips the final norm (§3.4)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # precomputed (cos, sin) for ``positions``
    ) -> torch.Tensor:
        cos, sin = rope if rope is not None else self.rotary_emb(positions, embeds.dtype)
        h = embeds
        for i, layer in enumerate(self.layers):
            h = run_layer(layer, self.gradient_checkpointing, h, cos, sin, mask, cache, i, start)
            if deepstack is not None and i < len(deepstack):
                h = add_at_mask(h, visual_mask, deepstack[i])
        return self.norm(h) if final_norm else h


def run_layer(layer: nn.Module, checkpointed: bool, h, cos, sin, mask, cache: KVCache | None, i: int, start: int):
    """layer(h, ...), or with gradient checkpointing (training only: no cache, gradients on) through
    torch.utils.checkpoint: the layer's activations are recomputed in the backward pass instead of kept, trading
    one extra forward per layer for memory (the reference trains with it on)."""
    if checkpointed and cache is None and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
    return layer(h, cos, sin, mask, cache, i, start)


def add_at_mask(h: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h[mask] += rows, out of place (autograd-safe); rows are in row-major (batch, position) order."""
    delta = torch.zeros_like(h).masked_scatter(mask[..., None], rows.to(h.dtype))
    return h + delta
