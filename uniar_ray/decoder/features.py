"""Bits -> decoder features (spec §8.1) and the slice of the ``bsq_encoder`` folder that computes them (§2.5).

``load_bsq_projections(folder, dtype, device)`` verifies the whole file against its config but keeps only the BSQ
output projections and ``merger.norm``; ``decoder_features(vision, bits, ar_height, ar_width)`` assembles features.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from uniar_ray.model.configuration import VisionConfig
from uniar_ray.model.loading import check_tensors, read_safetensors, safetensors_files
from uniar_ray.model.vision import VisionModel


def interleave_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """L tensors [R, Hv] -> [R, Hv*L] with channel c = h*L + l (interleaved per channel, not concatenated)."""
    return torch.stack(levels, dim=-1).flatten(-2)


def raster_order(rows: torch.Tensor, batch: int, grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """rows [B*N*U, C] ordered (sample, AR token n, sub-patch s) -> [B, grid_h*grid_w, C] in raster order over the
    patch grid. Tokens run row-major over the (grid_h/merge) x (grid_w/merge) token grid; sub-patch s = dy*merge + dx
    sits at patch (row*merge + dy, col*merge + dx)."""
    c = rows.shape[-1]
    x = rows.reshape(batch, grid_h // merge, grid_w // merge, merge, merge, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * grid_w, c)


def decoder_features(vision: VisionModel, bits: torch.Tensor, ar_height: int, ar_width: int,
                     deepstack_norm: bool = False) -> torch.Tensor:
    """bits [B, N, L, U, D] in {0, 1} -> features [B, (H/16)(W/16), L*Hv] in the BSQ modules' dtype.

    Per level the BSQ output projection of (2b - 1)/sqrt(D) (no merger); ``deepstack_norm`` passes deepstack levels
    through ``merger.norm`` (the reference's ``inference_skip_final_layernorm=False``, its decode-server default;
    the library and launch scripts skip it).
    """
    cfg = vision.cfg
    batch = bits.shape[0]
    levels = vision.level_features(bits, deepstack_norm=deepstack_norm)  # L x [B*N*U, Hv]
    return raster_order(interleave_levels(levels), batch, ar_height // cfg.patch_size, ar_width // cfg.patch_size,
                        cfg.spatial_merge_size)


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------

# Module names of VisionModel that the decoder never runs (the ViT, the BSQ input side, the mergers' MLPs).
_UNUSED = ("patch_embed", "pos_embed", "blocks", "deepstack_merger_list", "bsq")


def load_bsq_projections(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> VisionModel:
    """The ``bsq_encoder`` folder (a standalone UniARVisionModel, keys without the ``model.visual.`` prefix).

    Every tensor name and shape in the files is checked against the model its config.json describes (a mismatch is
    an error listing them; the reference silently re-initialises). Only the BSQ output projections and
    ``merger.norm`` are then read and kept: the decoder needs nothing else, and the published ViT (27 blocks) would
    otherwise sit in memory unused.
    """
    folder = Path(folder)
    cfg = VisionConfig.from_pretrained(folder)
    with torch.device("meta"):
        vision = VisionModel(cfg)
    expected = {k: v.shape for k, v in vision.state_dict().items()}
    check_tensors(expected, _read_shapes(folder), str(folder))
    _prune(vision)
    keep = set(vision.state_dict())
    state = read_safetensors(folder, keep=lambda k: k in keep)
    vision.load_state_dict({k: t.to(dtype=dtype, device=device) for k, t in state.items()}, strict=True, assign=True)
    return vision.eval().requires_grad_(False)


def _prune(vision: VisionModel) -> None:
    for name in _UNUSED + tuple(vision.level_names("input")):
        delattr(vision, name)
    for name in ("linear_fc1", "act_fn", "linear_fc2"):
        delattr(vision.merger, name)
    del vision.rotary_inv_freq  # ViT rotary table (non-persistent)


def _read_shapes(folder: Path) -> dict[str, torch.Tensor]:
    """Tensor names and shapes of a folder's safetensors files, as meta tensors (no data read)."""
    out = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = torch.empty(st.get_slice(k).get_shape(), device="meta")
    return out
