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

ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2")


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in fp32, cast back, then scale (the order matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x, self.eps)

    @staticmethod
    def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
        """x / rms(x) over the last axis in fp32, cast back (before the scale)."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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

    def write(self, i: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if isinstance(start, torch.Tensor):
            # Static shapes (CUDA graph capture): write one position at a device index, no host sync, and attend
            # over the whole buffer; the caller's mask hides the positions not yet written.
            self.k[i].index_copy_(2, start, k)
            self.v[i].index_copy_(2, start, v)
            return self.k[i], self.v[i]
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
    """Qwen3 attention: per-head q/k RMSNorm, M-RoPE, grouped-query attention.

    ``mask=None`` means "no padding": causal inside the new block, the whole cached prefix visible. That is the form
    in which SDPA may pick its flash kernel (and flash-attn needs no unpadding); with left padding the caller passes
    the explicit boolean mask.
    """

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
        self.qkv: FusedLinear | None = None  # set by fuse_projections (inference engines)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        """x [B, T, H]; cos/sin [B, T, hd]; mask [B, 1, T, S] bool with S = start + T (cache) or T, or None."""
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(self.attend(q, k, v, mask, cache, layer, start))

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, nh, T, hd], k/v [B, nkv, T, hd]: projections, q/k norm, rotary (no cache access,
        so the elementwise work can be fused by ``compile_decoder_layers``)."""
        b, t, _ = x.shape
        if self.qkv is not None and not torch.is_grad_enabled():  # fused weights are buffers: inference only
            return self._project_fused(x, cos, sin)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _project_fused(self, x, cos, sin):
        """``project`` with fewer small kernels (1,366 instead of 1,586 ops per decode step): q and k leave the
        fused matmul side by side, so their RMSNorm and rotary run once over both. Every step is per row or
        elementwise, so the numbers are the same as doing q and k apart (tested)."""
        b, t, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        y = self.qkv.matmul(x)  # [B, T, (nh + 2 nkv) * hd]
        qk = RMSNorm.normalize(y[..., : (nh + nkv) * hd].view(b, t, nh + nkv, hd), self.q_norm.eps)
        scale = torch.cat([self.q_norm.weight.expand(nh, hd), self.k_norm.weight.expand(nkv, hd)])
        qk = (scale * qk).transpose(1, 2)
        qk = qk * cos[:, None] + rotate_half(qk) * sin[:, None]
        v = y[..., (nh + nkv) * hd:].view(b, t, nkv, hd).transpose(1, 2)
        return qk[:, :nh], qk[:, nh:], v

    def attend(self, q, k, v, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        """Write k/v to the cache (if any), attend; returns [B, T, nh * hd] before o_proj."""
        b, _, t, _ = q.shape
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        if self.impl == "flash_attention_2":
            out = flash_attention(q, k, v, mask)
        elif self.impl == "sdpa":
            out = self._sdpa(q, k, v, mask)
        else:
            rep = self.n_heads // self.n_kv
            if mask is None:
                mask = causal_mask(t, k.shape[2], q.device)
            out = _eager_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), mask)
        return out.transpose(1, 2).reshape(b, t, -1)

    def _sdpa(self, q, k, v, mask):
        """SDPA without copying the K/V cache per head. One query (a decode step): the query heads that share a KV
        head become that head's query rows (the mask only selects keys), so no GQA support is needed and every SDPA
        kernel, flash included, qualifies. Longer blocks: SDPA's own GQA, causal flag when unpadded."""
        b, nh, t, hd = q.shape
        if t == 1:
            q = q.view(b, self.n_kv, nh // self.n_kv, hd)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(b, nh, 1, hd)
        if mask is None and k.shape[2] != t:
            mask = causal_mask(t, k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=self.n_heads != self.n_kv)


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """[1, 1, q_len, k_len] bool: the queries are the last q_len of k_len positions (bottom-right aligned)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]


def flash_attention(q, k, v, mask):
    """flash-attn 2 (the reference's ``--attn flash_attention_2``): q [B, nh, T, hd], k/v [B, nkv, S, hd].

    Without padding: ``flash_attn_func`` (its causal mask is bottom-right aligned, as a KV-cached step needs). With
    left padding: the variable-length kernel over the unpadded rows; padded query positions get zeros.
    """
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as e:
        raise ImportError("attn_impl='flash_attention_2' needs the flash-attn package (pip install "
                          "'uniar-ray[gpu]' on a CUDA machine); use attn_impl='sdpa' otherwise") from e
    b, _, t, _ = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # flash-attn layout [B, S, heads, hd]
    if mask is None:
        return flash_attn_func(q, k, v, causal=t > 1).transpose(1, 2)
    key_valid = mask[:, 0, -1, :]  # the last query sees every valid key (left padding, causal)
    q_valid = key_valid[:, -t:]
    cu_q, max_q = _cu_seqlens(q_valid)
    cu_k, max_k = _cu_seqlens(key_valid)
    out_unpadded = flash_attn_varlen_func(q[q_valid], k[key_valid], v[key_valid], cu_q, cu_k, max_q, max_k,
                                          causal=True)
    out = q.new_zeros(q.shape)
    out[q_valid] = out_unpadded
    return out.transpose(1, 2)


def _cu_seqlens(valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    lens = valid.sum(1, dtype=torch.int32)
    return F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)), int(lens.max())


class OneDNNWeight:
    """A weight reordered once for oneDNN (CPU inference), rebuilt whenever the weight is replaced or changed in
    place (its version counter moves), so it never goes stale.

    Why: at decode sizes (16-32 rows) MKL's sgemm repacks the weight on every call and streams ~6 GB/s of weights
    on one core here; oneDNN with the weight reordered once runs the same matmuls ~2x faster, fp32 and bf16
    (perf/RESULTS.md). Costs a second copy of the weight in memory. Rounding differs from MKL's in the last bits,
    as with any change of GEMM kernel.
    """

    ROWS = 16  # oneDNN's batch-size hint; 16 serves 1-512 rows well here (1 would be ~2x slower at 16 rows)
    # Decode-sized inputs only: oneDNN keeps memory per distinct row count, so prefills of ever new lengths grew
    # the process's peak from 350 to 950 MB over 100 batches; with this bound it levels off at ~650 MB
    # (perf/RESULTS.md). Larger inputs go to MKL's sgemm.
    MAX_ROWS = 256

    def __init__(self):
        self.packed: torch.Tensor | None = None
        self.key: tuple[int, int] | None = None

    def __getstate__(self):  # oneDNN's opaque tensors do not pickle or deep-copy: repack on first use instead
        return {"packed": None, "key": None}

    @staticmethod
    def applies(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
                and torch.backends.mkldnn.is_available())

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() > self.MAX_ROWS * x.shape[-1]:
            return F.linear(x, weight, bias)
        # An inference tensor has no version counter, but nothing can change it outside inference mode either.
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if key != self.key:
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.ROWS)
            self.key = key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose no-grad forward uses a ``OneDNNWeight``; parameters, names and training are
    untouched. Made by ``pack_linears``, which swaps the class of existing modules in place."""

    onednn: OneDNNWeight

    def forward(self, x):
        if torch.is_grad_enabled() or not OneDNNWeight.applies(self.weight):
            return super().forward(x)
        return self.onednn.linear(x, self.weight, self.bias)


def pack_linears(module: nn.Module) -> None:
    """Every ``nn.Linear`` under ``module`` becomes a ``PackedLinear`` (CPU inference engines)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
            m.onednn = OneDNNWeight()


class FusedLinear(nn.Module):
    """Several Linears over the same input as one matmul (fewer, larger kernels per step), prepacked for oneDNN on
    CPU when ``pack`` (see ``OneDNNWeight``).

    The original weights become views into the fused tensor, so ``state_dict`` names, ``update_weights`` (in-place
    copies) and loading keep working; only a later ``.to(dtype/device)`` would break the sharing, so fuse after
    placing the model (``refresh`` re-fuses if it happened).
    """

    def __init__(self, linears: list[nn.Linear], pack: bool = False):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        self._linears = tuple(linears)  # a tuple, not a ModuleList: they stay registered under their own names
        self.onednn = OneDNNWeight() if pack else None
        self._fuse()

    def _fuse(self) -> None:
        linears = self._linears
        with torch.no_grad():  # buffers, not parameters: the published names stay the only parameters
            self.register_buffer("weight", torch.cat([lin.weight for lin in linears]), persistent=False)
            bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
            self.register_buffer("bias", bias, persistent=False)
        offset = 0
        for lin, size in zip(linears, self.sizes):
            lin.weight = nn.Parameter(self.weight.narrow(0, offset, size), requires_grad=lin.weight.requires_grad)
            if bias is not None:
                lin.bias = nn.Parameter(self.bias.narrow(0, offset, size), requires_grad=lin.bias.requires_grad)
            offset += size

    def refresh(self) -> None:
        """Fuse again if a ``.to()`` replaced the weights (the fused copy must never go stale)."""
        if self.weight.data_ptr() != self._linears[0].weight.data_ptr():
            self._fuse()

    def forward(self, x):
        return self.matmul(x).split(self.sizes, dim=-1)

    def matmul(self, x):
        """The fused output, unsplit: [..., sum(sizes)]."""
        if self.onednn is not None and OneDNNWeight.applies(self.weight):
            return self.onednn.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def fuse_projections(module: nn.Module, pack: bool = False) -> None:
    """Inference engines only. Fuse q/k/v and gate/up projections of every decoder layer under ``module``; with
    ``pack`` (CPU) also prepack every Linear for oneDNN (``pack_linears``). Call again after moving or casting the
    module: it re-fuses what a ``.to()`` replaced."""
    for m in module.modules():
        if isinstance(m, Attention) and m.qkv is None:
            m.qkv = FusedLinear([m.q_proj, m.k_proj, m.v_proj], pack)
        elif isinstance(m, MLP) and m.gate_up is None:
            m.gate_up = FusedLinear([m.gate_proj, m.up_proj], pack)
        elif isinstance(m, FusedLinear):
            m.refresh()
    if pack:
        pack_linears(module)


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
        self.gate_up: FusedLinear | None = None  # set by fuse_projections (inference engines)

    def forward(self, x):
        if self.gate_up is not None and not torch.is_grad_enabled():  # fused weights are buffers: inference only
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (``layers.k.*`` in the backbone, ``visual_decoder.k.*`` in the visual stack)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.compiled = False  # see compile_decoder_layers

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        # Compiled for inference only: a trainer that shares the policy with its rollout engine (colocated) runs
        # its forward and backward eagerly, as the DeepSpeed trainer does.
        compiled = self.compiled and not torch.is_grad_enabled()
        pre, post = (_COMPILED["pre"], _COMPILED["post"]) if compiled else (_pre, _post)
        q, k, v = pre(self, x, cos, sin)
        return post(self, x, self.self_attn.attend(q, k, v, mask, cache, layer, start))


def _pre(layer: DecoderLayer, x, cos, sin):
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)


def _post(layer: DecoderLayer, x, attn):
    x = x + layer.self_attn.o_proj(attn)
    return x + layer.mlp(layer.post_attention_layernorm(x))


_COMPILED: dict = {}


def compile_decoder_layers(module: nn.Module) -> None:
    """Run every decoder layer's elementwise work (RMSNorms, rotary, residuals, SiLU) as Inductor-fused kernels
    around the matmuls; the cache write and attention stay eager. One compilation serves every layer and shape
    (parameters are graph inputs; dynamic shapes). On GPU this cuts a decode step's ~50 small kernels per layer
    to about a dozen, which is what a CUDA-graphed step is then bound by. Inference only (with gradients enabled
    the layers run eagerly); same math, though fused bf16 rounding may differ from eager in the last bit."""
    if not _COMPILED:
        _COMPILED["pre"] = torch.compile(_pre, dynamic=True)
        _COMPILED["post"] = torch.compile(_post, dynamic=True)
    for m in module.modules():
        if isinstance(m, DecoderLayer):
            m.compiled = True


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
        visual_mask: torch.Tensor | None = None,  # [B, T] bool, positions that get deepstack; None: all
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
                # visual_mask None: every position is an image position (a decode step), rows [B * T, H]
                h = h + deepstack[i].view(h.shape).to(h.dtype) if visual_mask is None else \
                    add_at_mask(h, visual_mask, deepstack[i])
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
