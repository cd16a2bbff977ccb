"""Prompt construction for image generation, as the reference builds it (spec §4.1, §5), and the tokenizer loader.

T2I text:  <|im_start|>user\\n{prompt}<image_gen> generate image {H/32} {W/32}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>
Edit mode puts <|vision_start|><|image_pad|>*n<|vision_end|> between the instruction and <image_gen>.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
PAD = "<|endoftext|>"
DOWNSAMPLE = 32  # patch 16 x merge 2: pixels per AR token side


def check_ar_size(ar_height: int, ar_width: int, what: str = "AR size") -> None:
    for name, v in (("height", ar_height), ("width", ar_width)):
        if not isinstance(v, int) or v <= 0 or v % DOWNSAMPLE:
            raise ValueError(f"{what}: {name}={v!r} is not a positive multiple of {DOWNSAMPLE} "
                             f"(each AR token covers {DOWNSAMPLE}x{DOWNSAMPLE} pixels)")


def generation_text(prompt: str, ar_height: int, ar_width: int, num_input_image_tokens: int = 0) -> str:
    """The templated string for one sample. ``num_input_image_tokens`` > 0 adds an input image (edit mode)."""
    check_ar_size(ar_height, ar_width)
    image = ""
    if num_input_image_tokens:
        image = VISION_START + IMAGE_PAD * num_input_image_tokens + VISION_END
    content = f"{prompt}{image}<image_gen> generate image {ar_height // DOWNSAMPLE} {ar_width // DOWNSAMPLE}"
    return f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n{VISION_START}"


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # [B, P] left-padded
    attention_mask: torch.Tensor  # [B, P] 1 = real token


def tokenize(tokenizer, texts: list[str], device: str | torch.device = "cpu") -> TokenizedPrompts:
    """Tokenise with left padding (the last column must be the real <|vision_start|> of every row)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return pad_left(rows, tokenizer.pad_token_id, device)


def pad_left(rows: list[list[int]], pad_id: int, device="cpu") -> TokenizedPrompts:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return TokenizedPrompts(ids.to(device), mask.to(device))


def load_tokenizer(folder: str | Path):
    """The checkpoint's own tokenizer (tokenizer.json etc. in the AR folder), left padding, pad = <|endoftext|>."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists():
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that model_type "uniar" is unknown to transformers: expected
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    finally:
        hf_logging.set_verbosity(level)
    if tok.pad_token_id is None:
        tok.pad_token = PAD
    tok.padding_side = "left"
    return tok
