"""Size limits checked in the driver before any work is queued: prompt length in tokens (truncate or refuse), the AR
size the model's positions and the decoder's position grid allow.

    limits = ModelLimits.load(cfg.model.path, decoder_root)      # tokenizer + max positions, from config files
    prompt, n = fit_prompt(limits.tokenizer, text, max_tokens=1024, overflow="truncate", what="idx 3")
    limits.check_ar_size(512, 512, upsampling_ratio=2.0, prompt_tokens=n)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from uniar_ray.model.prompts import DOWNSAMPLE

TEMPLATE_TOKENS = 64  # the chat template and the "generate image H W" suffix around the prompt, with room to spare
PROMPT_OVERFLOW = ("truncate", "error")


class LimitError(ValueError):
    """An input is over a limit; the message names the input, the limit, the config key that sets it."""


@dataclasses.dataclass
class ModelLimits:
    tokenizer: Any
    max_positions: int  # text_config.max_position_embeddings: prompt + image tokens of one sequence
    decoder_max_side: int | None = None  # largest decoder output side in pixels (position grid); None = unknown

    @classmethod
    def load(cls, model_path: str, decoder_root: str | Path | None = None) -> "ModelLimits":
        """From the files only (tokenizer, config.json): no weights are loaded."""
        if model_path == "tiny":
            from uniar_ray.model.tiny import build_tokenizer, tiny_config

            tokenizer, positions = build_tokenizer(), tiny_config().text_config.max_position_embeddings
        else:
            from uniar_ray.model.loading import resolve_ar_folder
            from uniar_ray.model.prompts import load_tokenizer

            positions = _positions(model_path)  # config.json first: a broken one is named, not the tokenizer's error
            tokenizer = load_tokenizer(resolve_ar_folder(model_path))
        return cls(tokenizer, positions, decoder_max_side(decoder_root) if decoder_root else None)

    def count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def check_ar_size(self, ar_height: int, ar_width: int, upsampling_ratio: float = 1.0, prompt_tokens: int = 0,
                      key: str = "settings.ar_height/ar_width", images: int = 1) -> None:
        """Image tokens (``images`` = 2 in edit mode: the input image at the AR size, then the output) + the longest
        prompt must fit the model's positions; the decoder's output must fit its position grid."""
        n = images * (ar_height // DOWNSAMPLE) * (ar_width // DOWNSAMPLE)
        need = n + prompt_tokens + TEMPLATE_TOKENS
        if self.max_positions and need > self.max_positions:
            side = int(((self.max_positions - prompt_tokens - TEMPLATE_TOKENS) / images) ** 0.5) * DOWNSAMPLE
            raise LimitError(f"{key}: AR size {ar_height}x{ar_width} needs {n} image tokens + {prompt_tokens} prompt "
                             f"tokens, over the model's {self.max_positions} positions (max_position_embeddings); "
                             f"a square AR size up to {max(side, 0)}x{max(side, 0)} fits")
        out = max(ar_height, ar_width) * upsampling_ratio
        if self.decoder_max_side and out > self.decoder_max_side:
            raise LimitError(f"{key}: AR size {ar_height}x{ar_width} x upsampling {upsampling_ratio:g} gives a "
                             f"{round(out)}-pixel side, over the decoder's {self.decoder_max_side} (its transformer's "
                             "pos_embed_max_size); lower the AR size or the upsampling ratio")


def decoder_max_side(root: str | Path) -> int | None:
    """pos_embed_max_size x patch_size x the VAE's scale, from the checkpoint's config files (None if absent)."""
    root = Path(root)
    tcfg = _read_json(root / "sd3_transformer" / "config.json")
    vcfg = _read_json(root / "sd3_pipeline" / "vae" / "config.json")
    if "pos_embed_max_size" not in tcfg or "block_out_channels" not in vcfg:
        return None
    return int(tcfg["pos_embed_max_size"]) * int(tcfg.get("patch_size", 2)) * 2 ** (len(vcfg["block_out_channels"]) - 1)


def decoder_output_size(root: str | Path, ar_height: int, ar_width: int,
                        upsampling_ratio: float) -> tuple[int, int] | None:
    """(height, width) of the decoder's images for an AR size, from the checkpoint's config files as
    ``UniARDecoder.output_size`` computes it (None when the files do not say)."""
    root = Path(root)
    tcfg = _read_json(root / "sd3_transformer" / "config.json")
    vcfg = _read_json(root / "sd3_pipeline" / "vae" / "config.json")
    if "block_out_channels" not in vcfg:
        return None
    m = int(tcfg.get("patch_size", 2)) * 2 ** (len(vcfg["block_out_channels"]) - 1)
    return m * max(1, round(ar_height * upsampling_ratio / m)), m * max(1, round(ar_width * upsampling_ratio / m))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise LimitError(f"{path}: cannot read the model's config ({e}); copy the checkpoint again") from None
    return data if isinstance(data, dict) else {}


def fit_prompt(tokenizer: Any, prompt: str, max_tokens: int, overflow: str, what: str,
               key: str = "max_prompt_tokens") -> tuple[str, int]:
    """``prompt`` within ``max_tokens`` tokens: as is, cut to its first ``max_tokens`` tokens (``truncate``: the
    reference truncates at max_prompt_length 1024), or ``LimitError`` (``error``). Returns (prompt, its tokens
    before any cut). 0 = no limit."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not max_tokens or len(ids) <= max_tokens:
        return prompt, len(ids)
    if overflow == "error":
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        raise LimitError(f"{what}: the prompt has {len(ids)} tokens, over {key}={max_tokens} (raise it, or set "
                         f"{section}prompt_overflow=truncate)")
    return tokenizer.decode(ids[:max_tokens]), len(ids)


def check_grpo_inputs(records: list, cfg: Any, notes: list[str] | None = None) -> list:
    """GRPO, before Ray starts (``uniar_ray.preflight``): the model's, the reference's and the decoder's weight files
    complete (named when not), every RL prompt within ``data.max_prompt_tokens`` (cut, counted and said, or refused
    with the records named), and ``ar_height x ar_width`` within the model's positions and the decoder's grid.
    ``cfg`` is a ``GRPORunConfig``; records are ``uniar_ray.data.PromptRecord``; returns them, cut where needed.
    ``notes``: a plan against a described cluster, where the files may live on the cluster only: what is missing
    here is appended to it instead of raised (a file that is here is checked all the same)."""
    from uniar_ray.model.loading import check_weight_files

    d = cfg.data
    decoder_root = cfg.decoder.path if cfg.decoder.path != "tiny" else None
    ref = cfg.grpo.ref_model_path if cfg.grpo.beta else ""
    for key, folder in (("model.path", cfg.model.path), ("grpo.ref_model_path", ref)):
        if folder and folder != "tiny":
            _tolerant(_weights_there, folder, notes=notes, what=f"{key}={folder}")
    if decoder_root:
        from uniar_ray.decoder.loading import resolve_components

        if _tolerant(resolve_components, decoder_root, notes=notes, what=f"decoder.path={decoder_root}"):
            check_weight_files(decoder_root)
    limits = _tolerant(ModelLimits.load, cfg.model.path, decoder_root, notes=notes, what=f"model.path={cfg.model.path}")
    if limits is None:  # no tokenizer here: sizes against what config.json there is; prompts when the job starts
        positions = _tolerant(_positions, cfg.model.path, notes=notes, what=f"model.path={cfg.model.path}")
        limits = ModelLimits(None, positions, decoder_max_side(decoder_root) if decoder_root else None)
        limits.check_ar_size(cfg.ar_height, cfg.ar_width, cfg.decode_upsampling_ratio, 0, key="ar_height/ar_width")
        return records
    out, cut, refused, longest = [], [], [], 0
    for r in records:
        try:
            prompt, n = fit_prompt(limits.tokenizer, r.prompt, d.max_prompt_tokens, d.prompt_overflow,
                                   f"{r.source} number {r.number} (line {r.line})", "data.max_prompt_tokens")
        except LimitError as e:
            refused.append(str(e))
            continue
        longest = max(longest, min(n, d.max_prompt_tokens or n))
        if prompt != r.prompt:
            cut.append(f"{r.source}:{r.line}")
            r = dataclasses.replace(r, prompt=prompt)
        out.append(r)
    if refused:
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise LimitError("\n".join(refused[:5]) + more)
    if cut:
        print(f"[grpo] {len(cut)} prompts over data.max_prompt_tokens={d.max_prompt_tokens} were truncated to it "
              f"({', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''}); data.prompt_overflow=error refuses them",
              flush=True)
    limits.check_ar_size(cfg.ar_height, cfg.ar_width, cfg.decode_upsampling_ratio, longest, key="ar_height/ar_width")
    return out


def _tolerant(fn, *args, notes: list[str] | None = None, what: str = ""):
    """``fn(*args)``; with ``notes``, a file missing here is noted (None returned) instead of raised."""
    try:
        return fn(*args)
    except FileNotFoundError as e:
        if notes is None:
            raise
        if not any(n.startswith(f"{what}: ") for n in notes):  # one note per file, however many checks it skips
            notes.append(f"{what}: not checked here ({e}); the job checks it, and the prompt lengths, before Ray "
                         "starts")
        return None


def _weights_there(folder: str) -> None:
    from uniar_ray.model.loading import check_weight_files

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not check_weight_files(folder):  # complete when there; none at all is a folder the actors cannot load
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files")


def _positions(model_path: str) -> int | None:
    from uniar_ray.model.loading import resolve_ar_folder

    if model_path == "tiny":
        from uniar_ray.model.tiny import tiny_config

        return tiny_config().text_config.max_position_embeddings
    text = _read_json(resolve_ar_folder(model_path) / "config.json").get("text_config", {})
    return int(text.get("max_position_embeddings", 0)) or None
