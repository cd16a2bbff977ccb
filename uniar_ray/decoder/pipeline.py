"""UniARDecoder: BSQ bits -> PIL images through the SD3 pipeline with feature injection (spec §8).

    decoder = UniARDecoder.from_pretrained(root, dtype=torch.bfloat16, device="cuda")
    images = decoder.decode(bits, ar_height=512, ar_width=512, upsampling_ratio=2.0, num_inference_steps=28,
                            guidance_scale=1.5, seeds=[0, 1])          # bits [B, N, L, U, D] -> B PIL images
Samples of different sizes / settings in one call are grouped and run as batches. Each sample's initial noise
comes from its own seed, so an image does not depend on what else shares its batch.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from uniar_ray.model.loading import check_weight_files

from .features import decoder_features, load_bsq_projections
from .loading import PromptEmbeddings, load_pipeline_parts, resolve_components
from .transformer import SD3TransformerWithBSQ
from .types import DECODER_PROMPT, DecodeFailure, DecodeRequest, DecodeResult

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DecodeError(ValueError):
    """Some samples of a ``decode`` call failed. ``results`` holds every sample's outcome (PIL image or
    DecodeFailure), so the images that did decode are not lost."""

    def __init__(self, results: list):
        self.results = results
        failed = [r for r in results if isinstance(r, DecodeFailure)]
        lines = [f"{len(failed)} of {len(results)} samples failed to decode:"] + [f"  {f}" for f in failed[:20]]
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class _Sample:
    """One validated sample."""

    index: int
    bits: torch.Tensor  # [N, L, U, D] uint8
    ar_height: int
    ar_width: int
    out_height: int
    out_width: int
    steps: int
    guidance: float
    seed: int

    def group_key(self) -> tuple:
        return self.ar_height, self.ar_width, self.out_height, self.out_width, self.steps, self.guidance


class UniARDecoder:
    """BSQ output projections + SD3 transformer with injection + VAE + flow-match scheduler + cached prompt."""

    def __init__(self, vision, transformer: SD3TransformerWithBSQ, vae, scheduler, prompt: PromptEmbeddings,
                 deepstack_norm: bool = False, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.vision, self.transformer, self.vae, self.scheduler = vision, transformer, vae, scheduler
        self.prompt = prompt
        self.deepstack_norm = deepstack_norm
        self.max_batch = max_batch
        self.device, self.dtype = transformer.device, transformer.dtype
        from diffusers.image_processor import VaeImageProcessor

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # output sides are multiples of one latent token (16 px for SD3: VAE /8, patch 2)
        self.size_multiple = self.vae_scale_factor * transformer.config.patch_size
        cfg = vision.cfg
        self.bits_tail = (cfg.num_levels, cfg.merge_unit, cfg.bsq_dim)  # (L, U, D)

    # ------------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, root: str | Path, dtype: torch.dtype = torch.bfloat16, device: Any = "cpu", *,
                        bsq_encoder_path: str | Path | None = None, sd3_transformer_path: str | Path | None = None,
                        sd3_pipeline_path: str | Path | None = None,
                        inference_skip_final_layernorm: bool | None = None, max_batch: int = 8,
                        prompt: str = DECODER_PROMPT, max_sequence_length: int = 256) -> "UniARDecoder":
        """Load from a UniAR checkpoint root (``root/{bsq_encoder,sd3_transformer,sd3_pipeline}``, with the AR model
        in ``root/ar_model`` or at the root; each folder can be overridden).

        ``inference_skip_final_layernorm``: None reads the ``bsq_encoder`` config.json key of that name when present,
        else True (the reference library's and launch scripts' value; its decode server's default is False, which
        passes deepstack levels through ``merger.norm``: same checkpoint, different features).
        """
        paths = resolve_components(root, bsq_encoder=bsq_encoder_path, sd3_transformer=sd3_transformer_path,
                                   sd3_pipeline=sd3_pipeline_path)
        device = torch.device(device or "cpu")
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        for folder in paths.values():  # a truncated file is named here, not inside diffusers
            check_weight_files(folder)
        vision = load_bsq_projections(paths["bsq_encoder"], dtype, device)
        transformer = SD3TransformerWithBSQ.from_folder(paths["sd3_transformer"], dtype, device)
        _check_feature_width(vision, transformer, paths)
        vae, scheduler, embeds = load_pipeline_parts(paths["sd3_pipeline"], transformer, dtype, device, prompt,
                                                     max_sequence_length)
        skip = inference_skip_final_layernorm
        if skip is None:
            skip = bool(vision.cfg.extra.get("inference_skip_final_layernorm", True))
        return cls(vision, transformer, vae, scheduler, embeds, deepstack_norm=not skip, max_batch=max_batch)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = "cpu", bit_driven: bool = False,
             **kwargs) -> "UniARDecoder":
        """A seeded tiny decoder, written as a four-folder checkpoint and loaded back through ``from_pretrained``.
        bit_driven: the demo's variant whose pixel colours follow the bits (``tiny.make_bit_driven``)."""
        from .tiny import write_tiny_decoder_checkpoint

        with tempfile.TemporaryDirectory(prefix="uniar-tiny-decoder-") as tmp:
            root = write_tiny_decoder_checkpoint(Path(tmp) / "ckpt", seed=seed, ar_model=False, bit_driven=bit_driven)
            return cls.from_pretrained(root, dtype=dtype, device=device, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------------------

    def output_size(self, ar_height: int, ar_width: int, upsampling_ratio: float) -> tuple[int, int]:
        """round(ar x ratio) per side, snapped to the nearest multiple of 16 (the reference raises in SD3's input
        check when round(ar x ratio) is not a multiple of 16; for every size it accepts the result is the same)."""
        m = self.size_multiple
        return (m * max(1, round(ar_height * upsampling_ratio / m)), m * max(1, round(ar_width * upsampling_ratio / m)))

    def decode(self, bits, ar_height, ar_width, upsampling_ratio=2.0, num_inference_steps=28, guidance_scale=1.5,
               seeds: Sequence[int] | None = None, on_error: str = "raise",
               on_step: Callable[[int, int], None] | None = None) -> list:
        """bits [B, N, L, U, D] (or a list of [N_k, L, U, D] for mixed sizes) in {0, 1} -> B PIL images.

        ``ar_height``, ``ar_width``, ``upsampling_ratio``, ``num_inference_steps``, ``guidance_scale``: one value or
        one per sample. ``seeds[k]`` fixes sample k's initial noise exactly as ``randn_tensor`` with
        ``torch.Generator(device).manual_seed(seeds[k])`` at batch size 1; None draws fresh seeds.
        A bad sample (wrong bits shape, AR size not a multiple of 32, ratio outside [1, 2], ...) or a failed group
        does not stop the others: with ``on_error="raise"`` a DecodeError listing the failures is raised after
        everything else decoded (its ``results`` hold all outcomes); ``"return"`` puts a DecodeFailure in place.
        ``on_step(i, n)`` is called after denoising step i of n of each batch (progress bars).
        """
        if on_error not in ("raise", "return"):
            raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'return'")
        if isinstance(bits, (torch.Tensor, np.ndarray)) and bits.ndim != 5:
            raise ValueError(f"bits have shape {tuple(bits.shape)}: expected [B, N, L, U, D] "
                             "(or a list of [N, L, U, D])")
        samples = list(bits)
        n = len(samples)
        if seeds is None:
            seeds = [secrets.randbits(63) for _ in range(n)]
        per = {name: _per_sample(name, value, n) for name, value in (
            ("ar_height", ar_height), ("ar_width", ar_width), ("upsampling_ratio", upsampling_ratio),
            ("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale), ("seeds", seeds))}
        items = [self._validate(i, samples[i], per["ar_height"][i], per["ar_width"][i], per["upsampling_ratio"][i],
                                per["num_inference_steps"][i], per["guidance_scale"][i], per["seeds"][i])
                 for i in range(n)]
        results = [Image.fromarray(r) if isinstance(r, np.ndarray) else r for r in self._decode_items(items, on_step)]
        if on_error == "raise" and any(isinstance(r, DecodeFailure) for r in results):
            raise DecodeError(results)
        return results

    def decode_pixels(self, bits: torch.Tensor, ar_height: int, ar_width: int, upsampling_ratio: float = 2.0,
                      num_inference_steps: int = 28, guidance_scale: float = 1.5,
                      seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``decode`` for samples of one size, kept on the decoder's device: bits [B, N, L, U, D] -> pixels
        [B, 3, H, W] in [0, 1], the decoder's dtype (``decode``'s images are these x 255, rounded), for rewards
        computed where the images are. Any bad sample raises."""
        seeds = [secrets.randbits(63) for _ in range(len(bits))] if seeds is None else list(seeds)
        if len(seeds) != len(bits):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(bits)} samples")
        items = [self._check(i, bits[i], ar_height, ar_width, upsampling_ratio, num_inference_steps, guidance_scale,
                             seeds[i]) for i in range(len(bits))]
        return torch.cat([self._run(items[s: s + self.max_batch], pixels=True)
                          for s in range(0, len(items), self.max_batch)])

    def decode_requests(self, requests: Sequence[DecodeRequest], upsampling_ratio: float = 2.0,
                        num_inference_steps: int = 28, guidance_scale: float = 1.5) -> list[DecodeResult]:
        """Bit-packed requests -> one DecodeResult (uint8 image or error text) per request, in order. The arguments
        fill the fields a request leaves None."""
        t0 = time.perf_counter()
        items = []
        for i, req in enumerate(requests):
            try:
                bits = req.bits()
            except Exception as e:  # noqa: BLE001 - malformed packing is this sample's problem only
                items.append(DecodeFailure(f"bad bits: {e}", i))
                continue
            items.append(self._validate(
                i, bits, req.ar_height, req.ar_width, _default(req.upsampling_ratio, upsampling_ratio),
                _default(req.num_inference_steps, num_inference_steps), _default(req.guidance_scale, guidance_scale),
                req.seed))
        outs = self._decode_items(items)
        seconds = time.perf_counter() - t0
        return [DecodeResult(req.request_id, out if isinstance(out, np.ndarray) else None,
                             "" if isinstance(out, np.ndarray) else out.error, seconds)
                for req, out in zip(requests, outs)]

    # ------------------------------------------------------------------------------------------------------------
    # validation and grouping
    # ------------------------------------------------------------------------------------------------------------

    def _validate(self, index, bits, ar_height, ar_width, ratio, steps, guidance, seed) -> _Sample | DecodeFailure:
        try:
            return self._check(index, bits, ar_height, ar_width, ratio, steps, guidance, seed)
        except ValueError as e:
            return DecodeFailure(str(e), index)

    def _check(self, index, bits, ar_height, ar_width, ratio, steps, guidance, seed) -> _Sample:
        unit = self.vision.cfg.downsample  # 32 px per AR token side
        for name, v in (("ar_height", ar_height), ("ar_width", ar_width)):
            if not _is_int(v) or v <= 0 or v % unit:
                raise ValueError(f"{name}={v!r}: AR sizes must be positive multiples of {unit}")
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 1.0 <= ratio <= 2.0:
            raise ValueError(f"upsampling_ratio={ratio!r}: must be between 1.0 and 2.0")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"num_inference_steps={steps!r}: must be a positive integer")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise ValueError(f"guidance_scale={guidance!r}: must be a finite number (<= 1 disables guidance)")
        if not _is_int(seed):
            raise ValueError(f"seed={seed!r}: must be an integer")
        bits = torch.as_tensor(bits)
        n_tokens = (ar_height // unit) * (ar_width // unit)
        want = (n_tokens, *self.bits_tail)
        if tuple(bits.shape) != want:
            raise ValueError(f"bits have shape {tuple(bits.shape)}, a {ar_height}x{ar_width} image needs {want} "
                             "(N, L, U, D)")
        if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
            bits = bits.to(torch.float32)
        not_binary = bits.is_floating_point() and bool((bits != bits.round()).any())
        if bits.numel() and (not_binary or bits.min() < 0 or bits.max() > 1):
            raise ValueError("bits must be 0 or 1")
        out_h, out_w = self.output_size(ar_height, ar_width, float(ratio))
        th, tw = out_h // self.size_multiple, out_w // self.size_multiple
        limit = self.transformer.config.pos_embed_max_size
        if max(th, tw) > limit:
            raise ValueError(f"output {out_h}x{out_w} exceeds the transformer's position grid ({limit} tokens a side, "
                             f"{limit * self.size_multiple} px)")
        patch = self.vision.cfg.patch_size
        if not self.transformer.config.super_resolution and (th, tw) != (ar_height // patch, ar_width // patch):
            raise ValueError(f"upsampling_ratio={ratio}: this transformer has super_resolution=false, so the output "
                             "must keep the AR size (ratio 1)")
        return _Sample(index, bits.to(torch.uint8), int(ar_height), int(ar_width), out_h, out_w, int(steps),
                       float(guidance), int(seed))

    def _decode_items(self, items: list[_Sample | DecodeFailure],
                      on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray | DecodeFailure]:
        """Valid samples grouped by (sizes, steps, guidance), in chunks of max_batch; a chunk that raises fails
        only its own samples."""
        out: list[Any] = list(items)
        groups: dict[tuple, list[_Sample]] = {}
        for item in items:
            if isinstance(item, _Sample):
                groups.setdefault(item.group_key(), []).append(item)
        for group in groups.values():
            for start in range(0, len(group), self.max_batch):
                chunk = group[start:start + self.max_batch]
                try:
                    images = self._run(chunk, on_step)
                except Exception as e:  # noqa: BLE001 - report per sample, keep decoding the other groups
                    logger.exception("decode of %d samples at %dx%d failed", len(chunk), chunk[0].out_height,
                                     chunk[0].out_width)
                    images = [DecodeFailure(f"decode failed: {type(e).__name__}: {e}", s.index) for s in chunk]
                for s, img in zip(chunk, images):
                    out[s.index] = img
        return out

    # ------------------------------------------------------------------------------------------------------------
    # the denoising run of one batch (same sizes, steps and guidance)
    # ------------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, chunk: list[_Sample], on_step: Callable[[int, int], None] | None = None,
             pixels: bool = False) -> list[np.ndarray] | torch.Tensor:
        first, b = chunk[0], len(chunk)
        cfg = first.guidance > 1.0  # as diffusers: guidance <= 1 runs the conditional branch only
        vsf, patch = self.vae_scale_factor, self.vision.cfg.patch_size
        lat_h, lat_w = first.out_height // vsf, first.out_width // vsf

        bits = torch.stack([s.bits for s in chunk]).to(self.device)
        feats = decoder_features(self.vision, bits, first.ar_height, first.ar_width, self.deepstack_norm)
        feature_grid = (first.ar_height // patch, first.ar_width // patch)
        tokens = self.transformer.embed_features(feats.to(self.dtype), feature_grid,
                                                 self.transformer.token_grid(lat_h, lat_w))
        if cfg and tokens is not None:
            tokens = torch.cat([torch.zeros_like(tokens), tokens])  # unconditional rows see zero features
        text, pooled = self.prompt.batch(b, cfg)
        latents = torch.cat([self._noise(s.seed, lat_h, lat_w) for s in chunk])
        scheduler, timesteps = self._timesteps(first.steps, lat_h, lat_w)
        for i, t in enumerate(timesteps):
            x = torch.cat([latents, latents]) if cfg else latents
            pred = self.transformer(x, text, pooled, t.expand(x.shape[0]), feature_tokens=tokens, return_dict=False)[0]
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + first.guidance * (cond - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        if pixels:
            return self.image_processor.denormalize(self._vae_decode(latents))
        return self._to_images(latents)

    def _noise(self, seed: int, lat_h: int, lat_w: int) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        gen = torch.Generator(device=self.device).manual_seed(seed)
        shape = (1, self.transformer.config.in_channels, lat_h, lat_w)
        return randn_tensor(shape, generator=gen, device=self.device, dtype=self.dtype)

    def _timesteps(self, steps: int, lat_h: int, lat_w: int):
        """A fresh scheduler (it keeps a step index) and its timesteps; ``mu`` as SD3 computes it when the
        scheduler uses dynamic shifting."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (calculate_shift,
                                                                                         retrieve_timesteps)

        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        kwargs = {}
        conf = scheduler.config
        if conf.get("use_dynamic_shifting", None):
            th, tw = self.transformer.token_grid(lat_h, lat_w)
            kwargs["mu"] = calculate_shift(th * tw, conf.get("base_image_seq_len", 256),
                                           conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                                           conf.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, **kwargs)
        return scheduler, timesteps

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the VAE's pixels [B, 3, H, W] in [-1, 1]."""
        conf = self.vae.config
        latents = latents / conf.scaling_factor + (conf.shift_factor or 0.0)
        return self.vae.decode(latents, return_dict=False)[0]

    def _to_images(self, latents: torch.Tensor) -> list[np.ndarray]:
        pixels = self._vae_decode(latents)
        arr = self.image_processor.postprocess(pixels, output_type="np")  # [B, H, W, 3] float in [0, 1]
        return [np.ascontiguousarray((a * 255).round().astype(np.uint8)) for a in arr]


def _check_feature_width(vision, transformer, paths) -> None:
    cfg = vision.cfg
    width = cfg.num_levels * cfg.hidden_size
    tc = transformer.config
    if tc.add_siglip_tensor_to_latent and tc.siglip_channels != width:
        raise ValueError(f"{paths['sd3_transformer']}: siglip_channels={tc.siglip_channels}, but the bsq_encoder at "
                         f"{paths['bsq_encoder']} gives {cfg.num_levels} levels x {cfg.hidden_size} = {width} channels")


def _per_sample(name: str, value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} samples")
        return list(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and getattr(value, "ndim", 0) > 0:
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} samples")
        return [v.item() for v in value]
    return [value] * n


def _default(value, default):
    return default if value is None else value


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)



def load_decoder(cfg) -> UniARDecoder:
    """The decoder a ``DecoderConfig`` names: ``tiny`` (seeded, written to a scratch folder and loaded back) or a
    checkpoint root."""
    kwargs = dict(dtype=DTYPES[cfg.dtype], device=cfg.device, max_batch=cfg.max_batch,
                  inference_skip_final_layernorm=cfg.inference_skip_final_layernorm)
    if cfg.path == "tiny":
        return UniARDecoder.tiny(seed=cfg.tiny_seed, bit_driven=cfg.tiny_bit_driven, **kwargs)
    return UniARDecoder.from_pretrained(cfg.path, **kwargs)
