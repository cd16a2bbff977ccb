"""Pictures for people: a false-colour view of BSQ bits (before any decoder) and captioned image grids.

The bit view is NOT a decoded image: each AR token's 2x2 sub-patches are coloured by the fraction of set bits in
three slices of their main-level code, so structure and determinism are visible without the diffusion decoder.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def bits_preview(bits: torch.Tensor, ar_height: int, ar_width: int, scale: int = 8) -> Image.Image:
    """bits [N, L, U, D] -> RGB image of (H/16 * scale) x (W/16 * scale) pixels."""
    gh, gw = ar_height // 32, ar_width // 32
    main = bits[:, 0].float()  # [N, U, D]
    d = main.shape[-1]
    rgb = torch.stack([main[..., i * d // 3:(i + 1) * d // 3].mean(-1) for i in range(3)], -1)  # [N, U, 3]
    rgb = rgb.view(gh, gw, 2, 2, 3).permute(0, 2, 1, 3, 4).reshape(gh * 2, gw * 2, 3)
    img = Image.fromarray((rgb.numpy() * 255).astype(np.uint8))
    return img.resize((gw * 2 * scale, gh * 2 * scale), Image.NEAREST)


def captioned_grid(images: list[Image.Image], captions: list[str], cols: int = 4, cell: int = 192) -> Image.Image:
    """A contact sheet: each image resized to ``cell`` wide with a caption strip under it."""
    rows = (len(images) + cols - 1) // cols
    strip = 28
    sheet = Image.new("RGB", (cols * cell, rows * (cell + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell, (i // cols) * (cell + strip)
        sheet.paste(img.convert("RGB").resize((cell, cell)), (x, y))
        draw.text((x + 4, y + cell + 4), cap[:34], fill="black")
    return sheet
