"""Where the decoder's parts live in a checkpoint (spec §2.1) and how the SD3 pipeline folder is read (§2.7).

``resolve_components(root)`` finds bsq_encoder / sd3_transformer / sd3_pipeline; ``load_pipeline_parts`` loads the
VAE and scheduler and encodes the constant decoder prompt once, after which the text encoders are dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import json
from pathlib import Path

import torch

COMPONENTS = ("bsq_encoder", "sd3_transformer", "sd3_pipeline")


def resolve_components(root: str | Path, **overrides: str | Path | None) -> dict[str, Path]:
    """Folder of each decoder component. ``root/<name>`` when it exists (the published four-folder layout, and the
    variant with the AR model at the root), else ``root`` itself when it is that component's folder; an explicit
    ``<name>=path`` override wins. Anything else is an error that says what was looked for."""
    root = Path(root)
    out = {}
    for name in COMPONENTS:
        if overrides.get(name):
            path = Path(overrides[name])
            if not path.is_dir():
                raise FileNotFoundError(f"{name} path {path} is not a folder")
            out[name] = path
        elif (root / name).is_dir():
            out[name] = root / name
        elif _is_component(root, name):
            out[name] = root
        else:
            raise FileNotFoundError(
                f"{root}: no {name}/ folder (a UniAR checkpoint root holds ar_model/ or the AR model itself, plus "
                f"{', '.join(c + '/' for c in COMPONENTS)}); pass {name}_path=... to point at it")
    unknown = set(overrides) - set(COMPONENTS)
    if unknown:
        raise TypeError(f"unknown component overrides {sorted(unknown)}; expected {COMPONENTS}")
    return out


def _is_component(folder: Path, name: str) -> bool:
    if name == "sd3_pipeline":
        return (folder / "model_index.json").is_file()
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    if name == "bsq_encoder":
        return data.get("model_type") == "uniar_vision"
    return str(data.get("_class_name", "")).startswith(("SD3Transformer2DModel", "SD3TransformerWithBSQ"))


@dataclasses.dataclass
class PromptEmbeddings:
    """The SD3 text conditioning of the decoder prompt, computed once (the reference re-encodes it every call)."""

    prompt: torch.Tensor  # [1, S, joint_attention_dim]: CLIP-L|G penultimate states (padded) ++ T5 states
    pooled: torch.Tensor  # [1, pooled_projection_dim]: CLIP-L|G pooled
    negative: torch.Tensor  # same text as the prompt (the reference passes it as the negative prompt too)
    negative_pooled: torch.Tensor

    def batch(self, n: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states and pooled projections for n samples; with CFG the rows are [uncond x n; cond x n]."""
        text, pooled = self.prompt.repeat(n, 1, 1), self.pooled.repeat(n, 1)
        if cfg:
            text = torch.cat([self.negative.repeat(n, 1, 1), text])
            pooled = torch.cat([self.negative_pooled.repeat(n, 1), pooled])
        return text, pooled


def load_pipeline_parts(folder: Path, transformer, dtype: torch.dtype, device: torch.device, prompt: str,
                        max_sequence_length: int = 256):
    """-> (vae, scheduler, PromptEmbeddings). The text encoders (CLIP-L, CLIP-G, T5 if the folder has one) are
    loaded, run once on ``prompt`` with diffusers' own SD3 prompt encoding, and released."""
    from diffusers import StableDiffusion3Pipeline

    # Components the folder lists as null (no T5, no IP-Adapter image encoder) must be passed as None explicitly.
    index = json.loads((folder / "model_index.json").read_text())
    absent = {name: None for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
              if index.get(name) in (None, [None, None])}
    with _quiet_loading():
        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(folder), transformer=transformer, dtype=dtype,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None, **absent)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=prompt, device=device,
            do_classifier_free_guidance=True, max_sequence_length=max_sequence_length)
    embeds = PromptEmbeddings(pe, ppe, npe, nppe)
    vae = pipe.vae.to(device).eval().requires_grad_(False)
    scheduler = pipe.scheduler
    del pipe  # drops the text encoders and tokenizers (T5-XXL alone is ~9 GB in bf16)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return vae, scheduler, embeds


@contextlib.contextmanager
def _quiet_loading():
    """No per-component progress bars while loading (they flood actor logs); restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()
