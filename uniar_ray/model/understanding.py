"""Image understanding (spec §6): the text forward and KV-cached text generation, images given as pixels or as bits.

``UniARPolicy.text_logits`` and ``UniARPolicy.generate_text`` call these. Inputs follow transformers' Qwen2-VL/Qwen3-VL
processor layout: ``<|image_pad|>`` already expanded to one token per merged patch, flattened ``pixel_values``.
"""
from __future__ import annotations

import torch

from .layers import KVCache, attention_mask
from .positions import rope_positions


def check_text_inputs(input_ids: torch.Tensor, attention_mask_2d: torch.Tensor) -> None:
    if input_ids.ndim != 2 or tuple(attention_mask_2d.shape) != tuple(input_ids.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask_2d.shape)} "
                         "must both be [B, S]")
    if not bool(attention_mask_2d[:, -1].all()):
        raise ValueError("input_ids must be left-padded (every row's last column a real token): "
                         "tokenise with padding_side='left'")


def image_embeds(policy, input_ids, pixel_values=None, image_grid_thw=None, image_bits=None):
    """Token embeddings with every image's features at its ``<|image_pad|>`` positions (Qwen3-VL's masked scatter).

    -> (embeds [B, S, H], visual_mask [B, S] or None, deepstack list of [n_image_tokens, H] or None, grids [I, 3]).
    Images come either as ``pixel_values`` [n_patches, C*T*P*P] (through the vision tower, BSQ bottleneck included)
    or as ``image_bits`` [n_image_tokens, L, U, D] (straight to the features the quantiser's bits give, spec §3.3).
    """
    lm, cfg = policy.model.language_model, policy.config
    embeds = lm.embed_tokens(input_ids)
    if pixel_values is None and image_bits is None:
        if image_grid_thw is not None and len(image_grid_thw):
            raise ValueError("image_grid_thw given without pixel_values or image_bits")
        if (input_ids == cfg.image_token_id).any():
            raise ValueError("input_ids contain <|image_pad|> tokens but neither pixel_values nor image_bits was given")
        return embeds, None, None, torch.zeros(0, 3, dtype=torch.long)
    if pixel_values is not None and image_bits is not None:
        raise ValueError("give the images either as pixel_values or as image_bits, not both")
    if image_grid_thw is None:
        raise ValueError("image_grid_thw [num_images, 3] is required with pixel_values or image_bits")
    grids = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3).cpu()
    v = cfg.vision_config
    n_tokens = int((grids.prod(-1) // v.merge_unit).sum())
    if pixel_values is not None:
        n_patches = int(grids.prod(-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape[0] != n_patches:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; image_grid_thw {grids.tolist()} "
                             f"needs [{n_patches}, C*T*P*P] (the Qwen2-VL image processor's flattened patches)")
        main, deep = policy.model.visual(pixel_values.to(policy.device), grids.to(policy.device))
    else:
        want = (n_tokens, *policy.bits_shape)
        if tuple(image_bits.shape) != want:
            raise ValueError(f"image_bits has shape {tuple(image_bits.shape)}; image_grid_thw {grids.tolist()} "
                             f"needs {want} (one row of L x U x D bits per merged image token, images in order)")
        main, deep = policy.model.visual.bits_to_features(image_bits.to(policy.device))
    visual_mask = input_ids == cfg.image_token_id
    found = int(visual_mask.sum())
    if found != n_tokens:
        raise ValueError(f"input_ids hold {found} <|image_pad|> tokens but image_grid_thw {grids.tolist()} gives "
                         f"{n_tokens} image tokens: expand each image's placeholder to t*h*w/{v.merge_unit} tokens "
                         "(the Qwen3-VL processor does this)")
    embeds = embeds.masked_scatter(visual_mask[..., None], main.to(embeds.dtype))
    return embeds, visual_mask, deep, grids


def text_positions(policy, input_ids, attention_mask_2d, grids) -> torch.Tensor:
    """Positions [3, B, S] as Qwen3-VL's ``get_rope_index`` (transformers 4.57): text after an image at max + 1."""
    cfg = policy.config
    return rope_positions(input_ids, attention_mask_2d, grids, image_token_id=cfg.image_token_id,
                          vision_start_token_id=cfg.vision_start_token_id,
                          spatial_merge_size=cfg.vision_config.spatial_merge_size)


def next_positions(positions: torch.Tensor, attention_mask_2d: torch.Tensor) -> torch.Tensor:
    """Position [B] of each row's first generated token: its largest real position + 1 (Qwen3-VL's rope delta:
    after an image, text positions run behind the sequence index, and generation continues from the positions)."""
    real = attention_mask_2d.bool()[None].expand_as(positions)
    return positions.masked_fill(~real, -1).amax(dim=(0, 2)) + 1


@torch.no_grad()
def text_logits(policy, input_ids, attention_mask_2d, pixel_values=None, image_grid_thw=None, image_bits=None):
    """Language-model logits [B, S, vocab] of the understanding forward (final norm + lm_head)."""
    check_text_inputs(input_ids, attention_mask_2d)
    input_ids, attention_mask_2d = input_ids.to(policy.device), attention_mask_2d.to(policy.device)
    embeds, vmask, deep, grids = image_embeds(policy, input_ids, pixel_values, image_grid_thw, image_bits)
    positions = text_positions(policy, input_ids, attention_mask_2d, grids)
    mask = attention_mask(attention_mask_2d.bool(), input_ids.shape[1])
    h = policy.model.language_model(embeds, positions, mask, visual_mask=vmask, deepstack=deep, final_norm=True)
    return policy.lm_head(h)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax, or a draw from softmax(logits / temperature) (no top-k / top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)


@torch.no_grad()
def generate_text(policy, input_ids, attention_mask_2d, pixel_values=None, image_grid_thw=None, image_bits=None,
                  max_new_tokens: int = 1024, do_sample: bool = False, temperature: float = 1.0,
                  seed: int | None = None, eos_token_ids: list[int] | None = None,
                  pad_token_id: int | None = None) -> torch.Tensor:
    """New token ids [B, T] (T <= max_new_tokens): each row stops after its first EOS and is padded after it.

    Prefill once, then one token per step through a preallocated KV cache.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling")
    check_text_inputs(input_ids, attention_mask_2d)
    eos_ids = list(eos_token_ids) if eos_token_ids is not None else default_eos_ids(policy)
    pad = pad_token_id if pad_token_id is not None else default_pad_id(policy, eos_ids)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=policy.device)
    dev, lm, tc = policy.device, policy.model.language_model, policy.config.text_config
    input_ids, attention_mask_2d = input_ids.to(dev), attention_mask_2d.to(dev)
    b, s = input_ids.shape
    embeds, vmask, deep, grids = image_embeds(policy, input_ids, pixel_values, image_grid_thw, image_bits)
    positions = text_positions(policy, input_ids, attention_mask_2d, grids)
    start = next_positions(positions, attention_mask_2d)  # [B]
    cache = KVCache(tc.num_hidden_layers, b, tc.num_key_value_heads, s + max_new_tokens, tc.head_dim, policy.dtype,
                    dev)
    key_valid = torch.cat([attention_mask_2d.bool(), torch.ones(b, max_new_tokens, dtype=torch.bool, device=dev)], 1)
    h = lm(embeds, positions, attention_mask(key_valid[:, :s], s), visual_mask=vmask, deepstack=deep, cache=cache,
           final_norm=True)
    logits = policy.lm_head(h[:, -1])
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        picked = _pick(logits, do_sample, temperature, gen)
        out[:, t] = torch.where(done, pad, picked)
        done |= torch.isin(picked, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            return out[:, : t + 1]
        pos = (start + t).view(1, b, 1).expand(3, b, 1)
        # Finished rows keep running on their own picks (any valid id): their outputs are pad from here on.
        h = lm(lm.embed_tokens(picked)[:, None], pos, attention_mask(key_valid[:, : s + t + 1], 1), cache=cache,
               start=s + t, final_norm=True)
        logits = policy.lm_head(h[:, -1])
    return out


def default_eos_ids(policy) -> list[int]:
    """EOS ids: the checkpoint's generation_config.json if it has one, else the tokenizer's EOS token."""
    gen_cfg = getattr(policy, "generation_config", None) or {}
    eos = gen_cfg.get("eos_token_id")
    if eos is None and policy.tokenizer is not None:
        eos = policy.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("no EOS token: the checkpoint has neither generation_config.json nor a tokenizer with an "
                         "eos_token; pass eos_token_ids=[...]")
    return [eos] if isinstance(eos, int) else list(eos)


def default_pad_id(policy, eos_ids: list[int]) -> int:
    """Fills rows after their EOS: generation_config.json's pad, else the tokenizer's, else the first EOS id."""
    gen_cfg = getattr(policy, "generation_config", None) or {}
    pad = gen_cfg.get("pad_token_id")
    if pad is None and policy.tokenizer is not None:
        pad = policy.tokenizer.pad_token_id
    if pad is None and not eos_ids:
        raise ValueError("no pad token: pass pad_token_id=...")
    return int(eos_ids[0] if pad is None else pad)
