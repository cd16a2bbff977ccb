"""The UniAR AR policy: Qwen3 backbone + BSQ vision tower + visual-decoder stack + bitwise head.

``UniARPolicy.from_pretrained(path)`` loads a published ``ar_model`` folder strictly; ``bit_logits`` is the
teacher-forced scorer of spec §7.6 (the RL forward). The rollout engines reuse its pieces step by step.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import understanding
from .configuration import UniARConfig
from .layers import ATTN_IMPLS, DecoderLayer, RMSNorm, TextModel, attention_mask, run_layer
from .loading import load_state_dict_strict, resolve_ar_folder, save_safetensors
from .positions import image_grid, rope_positions
from .prompts import check_ar_size, load_tokenizer
from .vision import VisionModel


def build_vistok_head(cfg: UniARConfig) -> nn.Module:
    """``output_layer_vistok``: plain Linear, RMSNorm->Linear, or RMSNorm->Linear->GELU(tanh)->Linear (§2.4)."""
    h, out, eps = cfg.text_config.hidden_size, cfg.head_out_dim, cfg.text_config.rms_norm_eps
    if cfg.vistok_pred_use_mlp:
        mid = 16 * 1024
        return nn.Sequential(RMSNorm(h, eps), nn.Linear(h, mid, bias=False), nn.GELU(approximate="tanh"),
                             nn.Linear(mid, out, bias=False))
    if cfg.vistok_pred_layernorm:
        return nn.Sequential(RMSNorm(h, eps), nn.Linear(h, out, bias=False))
    return nn.Linear(h, out, bias=False)


class _Backbone(nn.Module):
    """Holds ``model.language_model`` and ``model.visual`` so parameter names match the published files."""

    def __init__(self, cfg: UniARConfig):
        super().__init__()
        self.visual = VisionModel(cfg.vision_config, out_hidden_size=cfg.text_config.hidden_size)
        self.language_model = TextModel(cfg.text_config)


class UniARPolicy(nn.Module):
    def __init__(self, cfg: UniARConfig):
        super().__init__()
        cfg.validate_for_generation()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)
        self.output_layer_vistok = build_vistok_head(cfg)
        self.visual_decoder = nn.ModuleList(
            [DecoderLayer(cfg.text_config) for _ in range(cfg.visual_transformer_decoder_depth)]
        )
        self.tokenizer = None
        self.generation_config: dict = {}  # the checkpoint's generation_config.json (EOS / pad ids for chat)

    # ------------------------------------------------------------------------------------------------------------
    # loading / saving
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        attn_impl: str = "sdpa", bf16_rope_tables: bool = False) -> "UniARPolicy":
        """Load ``<path>/config.json`` (model_type uniar) or ``<path>/ar_model``; every tensor must match.

        bf16_rope_tables: see ``set_rope_table_rounding`` (reproduces the reference's GRPO trainer; default off =
        the reference's inference path, fp32 rotary tables).
        """
        folder = resolve_ar_folder(path)
        cfg = UniARConfig.from_pretrained(folder)
        with torch.device("meta"):
            policy = cls(cfg)
        load_state_dict_strict(policy, folder, dtype=dtype, device=device)
        policy.set_attn_impl(attn_impl)
        if bf16_rope_tables:
            policy.set_rope_table_rounding(torch.bfloat16)
        if (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists():
            policy.tokenizer = load_tokenizer(folder)
        if (folder / "generation_config.json").exists():
            policy.generation_config = json.loads((folder / "generation_config.json").read_text())
        return policy.eval()

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """config.json, model.safetensors and the tokenizer; ``state_dict`` replaces this module's own tensors (the
        trainer passes the ZeRO-3-gathered full state)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        save_safetensors(self.state_dict() if state_dict is None else state_dict, folder / "model.safetensors")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        if self.generation_config:
            (folder / "generation_config.json").write_text(json.dumps(self.generation_config, indent=2))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each backbone and visual-decoder layer in the backward pass instead of keeping its
        activations (training forwards only; generation with a KV cache is unaffected)."""
        self.model.language_model.gradient_checkpointing = bool(enabled)

    def set_attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={impl!r}: expected one of {ATTN_IMPLS}")
        for m in self.modules():
            if hasattr(m, "impl"):
                m.impl = impl

    def set_rope_table_rounding(self, dtype: torch.dtype | None) -> None:
        """Round the rotary inverse frequencies (text M-RoPE and ViT 2-D rotary) through ``dtype``, or not (None).

        The rotary tables are fp32 by default, also after ``.to(torch.bfloat16)``: that is what the reference computes
        when loaded with ``from_pretrained(dtype=bfloat16)`` (its inference scripts), and our RL scorer matches that
        path bit for bit in bf16. The reference's GRPO trainer instead loads, then calls ``model.to(torch.bfloat16)``,
        which also casts these buffers; ``torch.bfloat16`` here reproduces that (per-bit log-probs move by up to
        ~0.05 on the tiny model, more than bf16 noise).
        """
        for m in self.modules():
            if hasattr(m, "table_rounding"):
                m.table_rounding = dtype
                table = getattr(m, "inv_freq", None)
                if table is None:
                    table = getattr(m, "rotary_inv_freq", None)
                m.rebuild_buffers(table.device if table is not None else self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def bits_shape(self) -> tuple[int, int, int]:
        """(L, U, D): levels x sub-patches x bits per AR token."""
        v = self.config.vision_config
        return v.num_levels, v.merge_unit, v.bsq_dim

    # ------------------------------------------------------------------------------------------------------------
    # pieces shared by the scorer and the rollout engines
    # ------------------------------------------------------------------------------------------------------------

    def visual_stack(self, h, cos, sin, mask, cache=None, start: int = 0) -> torch.Tensor:
        """The visual-decoder layers over pre-norm backbone states h [B, T, H] (no final norm)."""
        for i, layer in enumerate(self.visual_decoder):
            h = run_layer(layer, self.model.language_model.gradient_checkpointing, h, cos, sin, mask, cache, i, start)
        return h

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> bit logits [..., L, U, D, 2] (index 0: logit of bit 0, index 1: of bit 1)."""
        return self.output_layer_vistok(h).view(*h.shape[:-1], *self.bits_shape, 2)

    def image_positions(self, prompt_ids, prompt_mask, ar_height: int, ar_width: int) -> torch.Tensor:
        """Positions [3, B, P + N] of [prompt | N image tokens] (§4.2)."""
        n = (ar_height // 32) * (ar_width // 32)
        b = prompt_ids.shape[0]
        image_ids = torch.full((b, n), self.config.image_token_id, dtype=torch.long, device=prompt_ids.device)
        ids = torch.cat([prompt_ids, image_ids], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(image_ids)], dim=1)
        v = self.config.vision_config
        grids = [image_grid(ar_height, ar_width, v.patch_size)] * b
        return rope_positions(ids, mask, grids, image_token_id=self.config.image_token_id,
                              vision_start_token_id=self.config.vision_start_token_id,
                              spatial_merge_size=v.spatial_merge_size)

    # ------------------------------------------------------------------------------------------------------------
    # teacher-forced scorer (RL forward, §7.6)
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The module's call is the teacher-forced scorer, so that a wrapper (DeepSpeed's engine: ZeRO-3 gathers the
        partitioned parameters in its forward hooks) runs it."""
        return self.bit_logits(*args, **kwargs)

    def bit_logits(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, bits: torch.Tensor,
                   ar_height: int, ar_width: int) -> torch.Tensor:
        """Per-bit logits [B, N, L, U, D, 2] of ``bits`` [B, N, L, U, D] given left-padded text prompts [B, P].

        Row i's logits at image position n are predicted from the prompt and bits[:, :n] (the backbone and the
        visual-decoder stack are causal), exactly the distribution the rollout sampled from at step n (cfg = 1).
        """
        check_ar_size(ar_height, ar_width)
        b, p = prompt_ids.shape
        n = (ar_height // 32) * (ar_width // 32)
        if tuple(bits.shape) != (b, n, *self.bits_shape):
            raise ValueError(f"bits have shape {tuple(bits.shape)}, expected {(b, n, *self.bits_shape)} "
                             f"for {b} prompts at AR size {ar_height}x{ar_width}")
        if (prompt_ids == self.config.image_token_id).any():
            raise ValueError("bit_logits scores text-to-image prompts only; the prompt contains image tokens")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column must be every row's <|vision_start|>")
        dev = self.device
        prompt_ids, attention_mask, bits = prompt_ids.to(dev), attention_mask.to(dev), bits.to(dev)
        lm = self.model.language_model
        text = lm.embed_tokens(prompt_ids)
        main, deep = self.model.visual.bits_to_features(bits.reshape(b * n, *self.bits_shape))
        embeds = torch.cat([text, main.view(b, n, -1).to(text.dtype)], dim=1)
        key_valid = torch.cat([attention_mask.bool(), torch.ones(b, n, dtype=torch.bool, device=dev)], dim=1)
        visual_mask = torch.zeros_like(key_valid)
        visual_mask[:, p:] = True
        positions = self.image_positions(prompt_ids, attention_mask, ar_height, ar_width)
        mask = attention_mask_4d(key_valid)
        h = lm(embeds, positions, mask, visual_mask=visual_mask, deepstack=deep)
        cos, sin = lm.rotary_emb(positions, h.dtype)
        h = self.visual_stack(h, cos, sin, mask)
        # The state at position j predicts token j+1: <|vision_start|> (p-1) and image positions 0..N-2.
        return self.head_logits(h[:, p - 1: p + n - 1])

    # ------------------------------------------------------------------------------------------------------------
    # understanding (spec §6): see uniar_ray/model/understanding.py
    # ------------------------------------------------------------------------------------------------------------

    def text_logits(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, image_bits=None):
        """Logits [B, S, vocab] of the text forward (the reference's ``forward(is_vistok_pred=False)``).

        input_ids/attention_mask [B, S] left-padded, ``<|image_pad|>`` expanded per merged patch; images as
        pixel_values [n_patches, C*T*P*P] + image_grid_thw [I, 3] (Qwen2-VL image processor layout) or as
        image_bits [n_image_tokens, L, U, D] + image_grid_thw.
        """
        return understanding.text_logits(self, input_ids, attention_mask, pixel_values, image_grid_thw, image_bits)

    def generate_text(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens=1024,
                      do_sample=False, temperature=1.0, seed=None, image_bits=None, eos_token_ids=None,
                      pad_token_id=None) -> torch.Tensor:
        """New token ids [B, T], KV-cached; each row stops after its first EOS, padded after (inputs as text_logits).

        Greedy by default (as the reference's chat); do_sample draws from softmax(logits / temperature), seeded.
        """
        return understanding.generate_text(self, input_ids, attention_mask, pixel_values, image_grid_thw, image_bits,
                                           max_new_tokens, do_sample, temperature, seed, eos_token_ids, pad_token_id)


def attention_mask_4d(key_valid: torch.Tensor) -> torch.Tensor:
    """Full-sequence causal + padding mask [B, 1, S, S]."""
    return attention_mask(key_valid, key_valid.shape[1])


def bit_logprobs(logits: torch.Tensor, bits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(bit) [..] of the given bits under logits [.., 2] / temperature, computed in fp32."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return lp.gather(-1, bits.long().unsqueeze(-1)).squeeze(-1)
