"""transformers CLIP loading and feature extraction shared by the CLIP-based rewards (HPS, PickScore, GenEval colour).

``clip = load_clip(folder)``; ``encode_images(clip, images)`` / ``encode_texts(clip, texts)`` -> projected features
(not normalised). PIL image processing (no torchvision); no hub downloads: ``folder`` is local.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Clip:
    model: Any  # transformers CLIPModel, eval mode
    tokenizer: Any
    processor: Any  # image processor
    device: torch.device
    max_length: int = 77


def load_image_processor(path: str):
    from transformers import AutoImageProcessor

    # The PIL backend on every machine: same pixels with or without torchvision installed.
    return AutoImageProcessor.from_pretrained(path, backend="pil")


def load_clip(path: str, device: str = "cpu", dtype: str = "float32", model=None) -> Clip:
    """CLIP from a local transformers folder (config, weights, tokenizer, preprocessor_config.json). ``model`` replaces
    the folder's weights (HPS: the converted checkpoint over the CLIP it was fine-tuned from)."""
    from transformers import AutoTokenizer, CLIPModel

    if model is None:
        model = CLIPModel.from_pretrained(path)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    max_length = int(model.config.text_config.max_position_embeddings)
    return Clip(model, tokenizer, load_image_processor(path), torch.device(device), max_length)


@torch.no_grad()
def encode_texts(clip: Clip, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """[N, D] projected text features; prompts longer than the context (77 tokens) are truncated."""
    feats = []
    for i in range(0, len(texts), batch_size):
        tok = clip.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                             max_length=clip.max_length, return_tensors="pt")
        out = clip.model.text_model(input_ids=tok["input_ids"].to(clip.device),
                                    attention_mask=tok["attention_mask"].to(clip.device))
        feats.append(clip.model.text_projection(out.pooler_output).float())
    return torch.cat(feats)


@torch.no_grad()
def encode_images(clip: Clip, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """[N, D] projected image features for PIL images or [H, W, 3] uint8 arrays."""
    dtype = next(clip.model.parameters()).dtype
    feats = []
    for i in range(0, len(images), batch_size):
        chunk = [Image.fromarray(im) if isinstance(im, np.ndarray) else im.convert("RGB")
                 for im in images[i:i + batch_size]]
        pixels = clip.processor(images=chunk, return_tensors="pt")["pixel_values"]
        out = clip.model.vision_model(pixel_values=pixels.to(clip.device, dtype))
        feats.append(clip.model.visual_projection(out.pooler_output).float())
    return torch.cat(feats)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)
