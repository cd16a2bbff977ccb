"""3-D (t, h, w) position ids for interleaved M-RoPE, as transformers 4.57's Qwen3-VL ``get_rope_index`` computes them.

Written out here because transformers 5.x changed that function's signature (spec §1); the semantics below are the
4.57 ones the published model was trained with (§4.2): padding -> 1 on all axes; text -> running index on all axes;
an image block of merged grid (h, w) starting at ``st`` -> (st, st + row, st + col); text after an image continues
at max + 1.
"""
from __future__ import annotations

import torch


def rope_positions(
    input_ids: torch.Tensor,  # [B, S]
    attention_mask: torch.Tensor,  # [B, S], 1 = real token
    image_grids: torch.Tensor | list,  # [I, 3] (t, h, w) in patches, for every image of every row, in order
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
) -> torch.Tensor:
    """-> positions [3, B, S] (int64).

    An image is a ``vision_start`` token directly followed by ``image_token_id``; its block is the run of
    (t * h/merge * w/merge) image tokens starting at the first image token after the previous block. Grids are
    consumed in order across the whole batch, like the reference (edit mode passes [in_0, out_0, in_1, out_1, ...]).
    """
    grids = torch.as_tensor(image_grids, dtype=torch.long).reshape(-1, 3).tolist()
    b, s = input_ids.shape
    out = torch.ones(3, b, s, dtype=torch.long)
    grid_iter = iter(grids)
    for row in range(b):
        keep = attention_mask[row].bool().cpu()
        tokens = input_ids[row].cpu()[keep].tolist()
        out[:, row, keep] = _row_positions(tokens, grid_iter, image_token_id, vision_start_token_id, spatial_merge_size)
    return out.to(input_ids.device)


def _row_positions(tokens, grid_iter, image_id, start_id, merge):
    n_images = sum(1 for i, t in enumerate(tokens[:-1]) if t == start_id and tokens[i + 1] == image_id)
    chunks, st, next_pos = [], 0, 0
    for _ in range(n_images):
        try:
            t, h, w = next(grid_iter)
        except StopIteration:
            raise ValueError("fewer image grids than images in input_ids") from None
        ed = tokens.index(image_id, st)
        text_len = ed - st
        chunks.append(torch.arange(text_len).expand(3, -1) + next_pos)
        gh, gw = h // merge, w // merge
        ti = torch.arange(t).view(-1, 1).expand(-1, gh * gw).flatten()
        hi = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten()
        wi = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten()
        block = torch.stack([ti, hi, wi]) + text_len + next_pos
        chunks.append(block)
        next_pos = int(block.max()) + 1
        st = ed + t * gh * gw
    if st < len(tokens):
        chunks.append(torch.arange(len(tokens) - st).expand(3, -1) + next_pos)
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)


def image_grid(ar_height: int, ar_width: int, patch_size: int = 16) -> list[int]:
    """Grid (t, h, w) in patches of an AR image of the given pixel size."""
    return [1, ar_height // patch_size, ar_width // patch_size]
