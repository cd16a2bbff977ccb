"""Config classes that read and write UniAR's published ``config.json`` (model_type "uniar" and "uniar_vision").

``UniARConfig.from_pretrained(folder)`` reads every field of spec §2.2-2.3; fields we do not use (e.g. the HF
bookkeeping keys) are kept in ``extra`` and written back unchanged, so a load/save round trip loses nothing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class _JsonConfig:
    """Shared JSON (de)serialisation: known dataclass fields plus a pass-through ``extra`` dict."""

    model_type: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        data.pop("model_type", None)
        obj = cls(**known)
        obj.extra = data
        return obj

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _JsonConfig) else value
        out.update(self.extra)
        return out


@dataclasses.dataclass
class TextConfig(_JsonConfig):
    """Qwen3-VL text backbone (``text_config``, model_type qwen3_vl_text); defaults are transformers 4.57's."""

    model_type = "qwen3_vl_text"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 5000000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def mrope_section(self) -> list[int]:
        # transformers' rotary module dereferences rope_scaling["mrope_section"] (crashes on None); say so clearly.
        scaling = self.rope_scaling or {}
        if "mrope_section" not in scaling:
            raise ValueError("text_config.rope_scaling must contain 'mrope_section' (e.g. [24, 20, 20])")
        return list(scaling["mrope_section"])


@dataclasses.dataclass
class VisionConfig(_JsonConfig):
    """Qwen3-VL ViT with the BSQ bottleneck (model_type uniar_vision); spec §2.3."""

    model_type = "uniar_vision"
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list = dataclasses.field(default_factory=lambda: [8, 16, 24])
    initializer_range: float = 0.02
    use_bsq: bool = True
    bsq_dim: int = 64
    bsq_hidden_dim: int = 8192
    bsq_skip_final_layernorm: bool = True
    # legacy fields: present in published configs, unused by the code
    vistok_pred: bool = False
    vistok_pred_layernorm: bool = False
    vistok_pred_transformer_head: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def num_levels(self) -> int:  # L: main level + one per deepstack level
        return 1 + len(self.deepstack_visual_indexes)

    @property
    def merge_unit(self) -> int:  # U: sub-patches per AR token
        return self.spatial_merge_size**2

    @property
    def downsample(self) -> int:  # pixels per AR token side (patch 16 x merge 2 = 32)
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VisionConfig":
        """Read a standalone ``bsq_encoder`` folder's config.json."""
        data = _read_json(Path(folder) / "config.json")
        _check_model_type(data, "uniar_vision", folder)
        return cls.from_dict(data)

    def save_pretrained(self, folder: str | Path) -> None:
        _write_json(Path(folder) / "config.json", self.to_dict())


@dataclasses.dataclass
class UniARConfig(_JsonConfig):
    """The AR model (model_type uniar): Qwen3-VL config plus the bitwise head and visual-decoder stack (§2.2)."""

    model_type = "uniar"
    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision_config: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    vistok_pred: bool = False
    vistok_pred_layernorm: bool = False
    vistok_pred_use_mlp: bool = False
    visual_transformer_decoder: bool = False
    visual_transformer_decoder_depth: int = 4
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UniARConfig":
        data = dict(data)
        text = TextConfig.from_dict(data.pop("text_config", None) or {})
        vision = VisionConfig.from_dict(data.pop("vision_config", None) or {})
        obj = super().from_dict(data)
        obj.text_config, obj.vision_config = text, vision
        return obj

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "UniARConfig":
        data = _read_json(Path(folder) / "config.json")
        _check_model_type(data, "uniar", folder)
        return cls.from_dict(data)

    def save_pretrained(self, folder: str | Path) -> None:
        _write_json(Path(folder) / "config.json", self.to_dict())

    @property
    def head_out_dim(self) -> int:
        """Width of ``output_layer_vistok``: D x 2 x U x L (2048 for the published model)."""
        v = self.vision_config
        return v.bsq_dim * 2 * v.merge_unit * v.num_levels

    def validate_for_generation(self) -> None:
        if not (self.vistok_pred and self.visual_transformer_decoder):
            raise ValueError(
                "this checkpoint cannot generate images: config.json needs vistok_pred=true and "
                "visual_transformer_decoder=true (published UniAR checkpoints have both)"
            )
        if self.text_config.num_hidden_layers < len(self.vision_config.deepstack_visual_indexes):
            raise ValueError("text_config.num_hidden_layers must be >= the number of deepstack levels")
        _ = self.text_config.mrope_section


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a checkpoint folder with a config.json")
    with open(path) as f:
        return json.load(f)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def _check_model_type(data: dict[str, Any], expected: str, folder: Any) -> None:
    found = data.get("model_type")
    if found != expected:
        raise ValueError(f"{folder}/config.json has model_type {found!r}, expected {expected!r}")
