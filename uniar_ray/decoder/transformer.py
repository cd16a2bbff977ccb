"""The SD3 transformer with BSQ feature injection (spec §8.2), a subclass of diffusers' ``SD3Transformer2DModel``.

``SD3TransformerWithBSQ.from_folder(path, dtype, device)`` loads a published ``sd3_transformer`` folder strictly;
``embed_features`` turns decoder features into the tokens that ``forward(..., feature_tokens=...)`` adds.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from uniar_ray.model.loading import check_tensors, read_safetensors


class SD3TransformerWithBSQ(SD3Transformer2DModel):
    """Stock SD3 plus ``siglip_embed_add_latent`` (Linear C -> inner_dim, no bias): projected BSQ features are added
    to the patch-embedded latent tokens before the joint blocks. Config fields and weight names are the published
    ``SD3Transformer2DModelWithSigLIP`` ones, so its ``config.json`` and weights load unchanged; the training-only
    fields (feature dropout, random-crop position embeddings, ``upscale_factor``) are kept for round trips and unused.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        siglip_channels: int | None = None,
        drop_image_token_prob_for_cfg: float = 0.0,
        image_token_scale_factor: float = 1.0,
        add_siglip_tensor_to_latent: bool = True,
        super_resolution: bool = False,
        upscale_factor: int = 1,
        train_use_random_crop_pos_embed: bool = False,
        random_crop_pos_embed_max_resolution: int | None = None,
    ):
        super().__init__(
            sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim, caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim, out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size, dual_attention_layers=dual_attention_layers, qk_norm=qk_norm,
        )
        if add_siglip_tensor_to_latent:
            if not siglip_channels:
                raise ValueError("sd3_transformer config: siglip_channels must be set (L x vision hidden size)")
            self.siglip_embed_add_latent = nn.Linear(siglip_channels, self.inner_dim, bias=False)
            nn.init.zeros_(self.siglip_embed_add_latent.weight)  # a fresh model starts as stock SD3

    # ------------------------------------------------------------------------------------------------------------
    # feature injection
    # ------------------------------------------------------------------------------------------------------------

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent-token grid of a latent of ``height x width`` (latent pixels)."""
        p = self.config.patch_size
        return height // p, width // p

    def embed_features(self, features: torch.Tensor, feature_grid: tuple[int, int],
                       token_grid: tuple[int, int]) -> torch.Tensor | None:
        """features [B, gh*gw, C] in raster order over ``feature_grid`` -> [B, th*tw, inner_dim] to add to the latent
        tokens (None when the checkpoint does not inject).

        Scale by ``image_token_scale_factor``, bicubic-resample (align_corners False) the feature grid to the token
        grid when ``super_resolution`` is on, project. The reference reshapes to a square grid when the sizes differ;
        here the true (gh, gw) is used, so non-square images upsample correctly (same result for square ones).
        The features are constant over the denoising steps, so callers compute this once per decode.
        """
        cfg = self.config
        if not cfg.add_siglip_tensor_to_latent:
            return None
        b, seq, c = features.shape
        gh, gw = feature_grid
        th, tw = token_grid
        if seq != gh * gw:
            raise ValueError(f"features hold {seq} rows, feature grid {gh}x{gw} needs {gh * gw}")
        if c != cfg.siglip_channels:
            raise ValueError(f"features have {c} channels, the transformer expects "
                             f"siglip_channels={cfg.siglip_channels}")
        x = features * cfg.image_token_scale_factor
        if cfg.super_resolution:
            x = x.reshape(b, gh, gw, c).permute(0, 3, 1, 2)
            x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False)
            x = x.permute(0, 2, 3, 1).reshape(b, th * tw, c)
        elif (gh, gw) != (th, tw):
            raise ValueError(f"feature grid {gh}x{gw} differs from the latent token grid {th}x{tw} and this "
                             "transformer has super_resolution=false: use upsampling_ratio 1")
        return self.siglip_embed_add_latent(x)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                pooled_projections: torch.Tensor = None, timestep: torch.Tensor = None,
                feature_tokens: torch.Tensor | None = None, **kwargs):
        """Stock SD3 forward; ``feature_tokens`` [B, T, inner_dim] (from ``embed_features``; zeros for CFG's
        unconditional rows) are added to the output of the patch embedding, i.e. to the latent tokens after their
        position embedding and before the first joint block."""
        if feature_tokens is None:
            return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, **kwargs)
        th, tw = self.token_grid(*hidden_states.shape[-2:])
        expected = (hidden_states.shape[0], th * tw, self.inner_dim)
        if tuple(feature_tokens.shape) != expected:
            raise ValueError(f"feature_tokens {tuple(feature_tokens.shape)} != {expected} for latents "
                             f"{tuple(hidden_states.shape)}")

        def add_features(module, args, output):
            return output + feature_tokens

        # A hook keeps diffusers' own forward (attention backends, skip layers, ...) instead of a copy of it. It lives
        # for this call only, so one module must not run forwards from several threads at once (actors don't).
        handle = self.pos_embed.register_forward_hook(add_features)
        try:
            return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, **kwargs)
        finally:
            handle.remove()

    # ------------------------------------------------------------------------------------------------------------
    # strict loading
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device="cpu") -> "SD3TransformerWithBSQ":
        """Build from ``folder/config.json`` on the meta device, then load every tensor of the folder's safetensors
        files: a missing, unexpected or wrong-shaped tensor is an error that lists them (nothing is re-initialised,
        unlike the reference's loader)."""
        folder = Path(folder)
        config = _read_config(folder)
        with torch.device("meta"):
            model = cls.from_config(config)
        state = read_safetensors(folder)
        check_tensors({k: v.shape for k, v in model.state_dict().items()}, state, str(folder), optional=())
        cast = {k: (t.to(dtype) if t.is_floating_point() else t).to(device) for k, t in state.items()}
        model.load_state_dict(cast, strict=True, assign=True)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{folder}: tensors not materialised after loading: {left}")
        return model.eval().requires_grad_(False)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a diffusers sd3_transformer folder")
    config = json.loads(path.read_text())
    name = config.get("_class_name", "")
    if not (name.startswith("SD3Transformer2DModel") or name == SD3TransformerWithBSQ.__name__):
        raise ValueError(f"{path}: _class_name {name!r} is not an SD3 transformer")
    return config
