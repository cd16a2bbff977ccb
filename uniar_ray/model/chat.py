"""Chat inputs built as the reference's ``inference/chat.py`` builds them: the checkpoint's chat template and image
processor, one user message ``[image, text]``; ``jobs.chat`` and the tests use ``ChatProcessor``.

transformers' ``Qwen3VLProcessor`` cannot be constructed without torchvision (its video processor), which the CPU
set-up removes, so this does its image part itself: template -> each ``<|image_pad|>`` expanded to t*h*w/merge^2
tokens -> tokenise; pixels from the checkpoint's ``preprocessor_config.json`` image processor (PIL fallback on CPU).
An image can also come as bits (``uniar_ray.bits.BitsFile``): its grid is the AR grid, nothing is decoded.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .prompts import IMAGE_PAD, pad_left


@dataclasses.dataclass
class ChatInputs:
    input_ids: torch.Tensor  # [B, S] left-padded
    attention_mask: torch.Tensor  # [B, S]
    image_grid_thw: torch.Tensor | None  # [I, 3] (t, h, w) in patches, images in row order
    pixel_values: torch.Tensor | None = None  # [n_patches, C*T*P*P] (Qwen2-VL image processor layout)
    image_bits: torch.Tensor | None = None  # [n_image_tokens, L, U, D] uint8

    def model_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid_thw, image_bits=self.image_bits)


def load_chat_template(folder: Path, tokenizer) -> str:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, or the tokenizer's own."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or a "
                            "chat_template in tokenizer_config.json); copy the one the model was trained with")


def load_image_processor(folder: Path):
    """The checkpoint's image processor (preprocessor_config.json); without torchvision transformers gives its PIL
    variant (same arithmetic)."""
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no preprocessor_config.json (the Qwen2-VL/Qwen3-VL image processor "
                                "settings: patch_size, merge_size, image_mean/std, size); copy the published one")
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "requires torchvision, falling back to PIL" on CPU set-ups: expected
    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)


class ChatProcessor:
    def __init__(self, tokenizer, chat_template: str, image_processor=None, merge_size: int = 2,
                 patch_size: int = 16):
        self.tokenizer, self.chat_template, self.image_processor = tokenizer, chat_template, image_processor
        self.merge_size, self.patch_size = merge_size, patch_size

    @classmethod
    def from_pretrained(cls, folder: str | Path, tokenizer, vision_config) -> "ChatProcessor":
        folder = Path(folder)
        proc = load_image_processor(folder)
        merge = getattr(proc, "merge_size", vision_config.spatial_merge_size)
        if merge != vision_config.spatial_merge_size or getattr(proc, "patch_size", 16) != vision_config.patch_size:
            raise ValueError(f"{folder}/preprocessor_config.json: patch_size {proc.patch_size} / merge_size {merge} "
                             f"differ from the model's vision config ({vision_config.patch_size} / "
                             f"{vision_config.spatial_merge_size})")
        return cls(tokenizer, load_chat_template(folder, tokenizer), proc, merge, vision_config.patch_size)

    def text(self, prompt: str, with_image: bool) -> str:
        """One user message, image first then the question (as chat.py), plus the generation prompt."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, prompts: list[str], images: list | None = None, bits: list | None = None) -> ChatInputs:
        """prompts [B]; images: one PIL image (or None) per row; or bits: one ``BitsFile`` (or None) per row."""
        if images is not None and bits is not None:
            raise ValueError("give images either as pictures or as bits in one batch, not both")
        given = images if images is not None else bits if bits is not None else [None] * len(prompts)
        if len(given) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(given)} images")
        grids, pixel_values, bit_rows = [], None, []
        if images is not None and any(im is not None for im in images):
            out = self.image_processor(images=[im for im in images if im is not None], return_tensors="pt")
            pixel_values, grids = out["pixel_values"], out["image_grid_thw"].tolist()
        for b in bits or []:
            if b is not None:
                grids.append([1, b.ar_height // self.patch_size, b.ar_width // self.patch_size])
                bit_rows.append(b.bits)
        grid_iter = iter(grids)
        rows = []
        for prompt, item in zip(prompts, given):
            text = self.text(prompt, item is not None)
            if item is not None:
                t, h, w = next(grid_iter)
                text = text.replace(IMAGE_PAD, IMAGE_PAD * (t * h * w // self.merge_size ** 2), 1)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        tp = pad_left(rows, self.tokenizer.pad_token_id)
        grid_t = torch.tensor(grids, dtype=torch.long) if grids else None
        return ChatInputs(tp.input_ids, tp.attention_mask, grid_t, pixel_values,
                          torch.cat(bit_rows) if bit_rows else None)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
