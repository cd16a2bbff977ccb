"""Edit-mode input images -> Qwen3-VL patch rows (rescale, normalise, temporal duplication, merge-window order).

The reference resizes to the AR size, then to multiples of 28, then of 32 (spec §5); here the image is resized once,
straight to the AR size (a multiple of 32), which is what that double resampling was approximating.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs before decoding


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image; a clear ValueError for anything that is not a readable image."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"image of {img.width}x{img.height} pixels is larger than the {MAX_PIXELS} pixel limit")
        img.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"cannot decode the input image ({len(data)} bytes): {e}") from None
    return img.convert("RGB")


def image_to_patches(img: Image.Image, height: int, width: int, patch: int = 16, temporal: int = 2, merge: int = 2,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> tuple[torch.Tensor, list[int]]:
    """-> patches [h*w, 3*temporal*patch*patch] float32 in merge-window order, grid (1, h, w) in patches."""
    img = img.resize((width, height), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = torch.from_numpy(x).permute(2, 0, 1)  # [C, H, W]
    x = x[None].expand(temporal, -1, -1, -1)  # a still image is duplicated in time
    gh, gw = height // patch, width // patch
    c = x.shape[1]
    x = x.reshape(1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * temporal * patch * patch).contiguous(), [1, gh, gw]
