"""One prompt (or several) to PNG files, with the options and defaults of the reference's inference/generate.py.

    python -m jobs.generate --prompt "a red apple" --output apple.png           # the tiny model on CPU, no download
    python -m jobs.generate --model /ckpt/UniAR --prompt "a red apple" --output apple.png --save-bits
    python -m jobs.generate --prompt "make the apple blue" --image apple.png --output blue.png      # edit mode
    python -m jobs.generate --model_path /ckpt/UniAR --prompt "A cute anime girl." --output_path generated.png \\
        --attn sdpa                                              # the reference's inference/generate.py spelling
    ray job submit --working-dir . -- python -m jobs.generate --model /ckpt/UniAR --device cuda \\
        --prompt "a red apple" --output /shared/out/apple.png
Several ``--prompt`` write ``<output stem>_<i>.png``; sample i uses seed ``--seed + i`` (AR sampling and decoder).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from uniar_ray.image_source import is_url

# The reference's names and defaults (inference/generate.py); each option also takes its hyphenated spelling, and
# --model its --model_path, --output_path its --output.
OPTIONS = [
    ("--prompt", dict(action="append", required=True, help="text prompt; repeat for several images")),
    ("--output_path", dict(default="generated.png", help="PNG path (several prompts: <stem>_<i>.png)")),
    ("--model", dict(default="tiny", help="UniAR checkpoint root (ar_model/, bsq_encoder/, sd3_transformer/, "
                                          "sd3_pipeline/), or tiny: a seeded tiny model cached under "
                                          "~/.cache/uniar-ray")),
    ("--image", dict(default=None, help="input image for edit mode (resized to the AR size): a local file or an "
                                        "http(s) URL")),
    ("--ar_height", dict(type=int, default=None, help="AR visual-token rollout height (multiple of 32; default 960)")),
    ("--ar_width", dict(type=int, default=None, help="AR visual-token rollout width (multiple of 32; default 960)")),
    ("--image_height", dict(type=int, default=None, help="the reference's deprecated alias of --ar_height")),
    ("--image_width", dict(type=int, default=None, help="the reference's deprecated alias of --ar_width")),
    ("--upsampling_ratio", dict(type=float, default=1.067, help="decoder output size / AR size, in [1, 2]")),
    ("--temperature", dict(type=float, default=1.0)),
    ("--cfg", dict(type=float, default=1.5, help="AR classifier-free guidance scale (1 = off)")),
    ("--cfg_mode", dict(default="reference", choices=["reference", "shared"], help="see README: CFG modes")),
    ("--decoder_num_inference_steps", dict(type=int, default=28)),
    ("--decoder_cfg_scale", dict(type=float, default=1.5, help="decoder guidance (<= 1 = off)")),
    ("--seed", dict(type=int, default=0)),
    ("--save_bits", dict(action="store_true", help="also write the packed bits beside each PNG (<stem>.bits.npz)")),
    ("--device", dict(default="", help="cpu, cuda or cuda:N (default: cuda when available)")),
    ("--dtype", dict(default="", choices=["", "float32", "bfloat16"], help="default: bfloat16 on GPU, else float32")),
    ("--attn", dict(default="flash_attention_2", choices=["flash_attention_2", "sdpa", "eager"],
                    help="attention kernels, the reference's choices and default; flash_attention_2 needs CUDA and "
                         "the flash-attn package: without CUDA eager is used, without the package sdpa")),
    ("--no_progress", dict(action="store_true", help="no progress bars")),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.split("\n")[0])
    for name, kw in OPTIONS:
        names = [name] + ([name.replace("_", "-")] if "_" in name else [])
        names += {"--output_path": ["--output"], "--model": ["--model_path", "--model-path"]}.get(name, [])
        parser.add_argument(*names, **kw)
    args = parser.parse_args(argv)
    problems = resolve_ar_size(args) + check_args(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def resolve_ar_size(args: argparse.Namespace) -> list[str]:
    """--image_height/--image_width (the reference's deprecated names) set the AR size when --ar_height/--ar_width do
    not; both with different values is a problem. Unset: 960x960, the reference's default."""
    problems = []
    for ar, old in (("ar_height", "image_height"), ("ar_width", "image_width")):
        given, alias = getattr(args, ar), getattr(args, old)
        if given is not None and alias is not None and given != alias:
            problems.append(f"--{ar} {given} and --{old} {alias} disagree (--{old} is the reference's old name of "
                            f"--{ar}); give one of them")
        setattr(args, ar, given if given is not None else alias if alias is not None else 960)
    return problems


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments, found before any model is loaded."""
    from uniar_ray.model.prompts import check_ar_size

    problems = [f"--prompt {p!r}: empty" for p in args.prompt if not p.strip()]
    try:
        check_ar_size(args.ar_height, args.ar_width, "--ar_height/--ar_width")
    except ValueError as e:
        problems.append(str(e))
    if not (math.isfinite(args.upsampling_ratio) and 1.0 <= args.upsampling_ratio <= 2.0):
        problems.append(f"--upsampling_ratio {args.upsampling_ratio}: must be in [1, 2]")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        problems.append(f"--temperature {args.temperature}: must be > 0")
    if not (math.isfinite(args.cfg) and args.cfg >= 1):
        problems.append(f"--cfg {args.cfg}: must be >= 1 (1 turns guidance off)")
    if args.decoder_num_inference_steps < 1:
        problems.append(f"--decoder_num_inference_steps {args.decoder_num_inference_steps}: must be >= 1")
    if not math.isfinite(args.decoder_cfg_scale):
        problems.append(f"--decoder_cfg_scale {args.decoder_cfg_scale}: must be a finite number")
    if Path(args.output_path).suffix.lower() != ".png":
        problems.append(f"--output {args.output_path}: must end in .png")
    if args.model != "tiny" and not Path(args.model).is_dir():
        problems.append(f"--model {args.model}: not a folder (a UniAR checkpoint root, or tiny)")
    if args.image is not None and not is_url(args.image) and not Path(args.image).is_file():
        problems.append(f"--image {args.image}: no such file")
    return problems


def output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    import torch

    from uniar_ray.bits import bits_file_path, save_bits_file
    from uniar_ray.image_source import open_image_source
    from uniar_ray.model.factory import usable_attn
    from uniar_ray.rollout import GenerationRequest, Rollout, TorchRolloutEngine

    # an unreadable input (missing, not an image, a URL that does not answer) is reported before the models load
    image = open_image_source(args.image)[0] if args.image is not None else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    attn, note = usable_attn(args.attn, device)
    if note:
        print(f"[generate] {note}", file=sys.stderr)
    policy, decoder = load_models(args.model, dtype, device, attn)

    n = len(args.prompt)
    requests = [GenerationRequest(p, args.ar_height, args.ar_width, seed=args.seed + i, temperature=args.temperature,
                                  cfg_scale=args.cfg, cfg_mode=args.cfg_mode, image=image, return_logprobs=False)
                for i, p in enumerate(args.prompt)]
    engine = TorchRolloutEngine(policy)
    batches = math.ceil(n / engine.max_batch)
    tokens = (args.ar_height // 32) * (args.ar_width // 32)
    with StepBar(tokens * batches, "AR steps", args.no_progress) as step:
        results = engine.generate(requests, on_step=step)
    errors = [r.error for r in results if not isinstance(r, Rollout)]
    if errors:
        raise SystemExit("[generate] " + "; ".join(errors))
    bits = torch.stack([r.bits() for r in results])
    with StepBar(args.decoder_num_inference_steps * math.ceil(n / decoder.max_batch), "denoising steps",
                  args.no_progress) as step:
        images = decoder.decode(bits, args.ar_height, args.ar_width, args.upsampling_ratio,
                                args.decoder_num_inference_steps, args.decoder_cfg_scale,
                                seeds=[args.seed + i for i in range(n)], on_step=step)
    paths = output_paths(args.output_path, n)
    for path, img, r in zip(paths, images, results):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
        print(f"saved image: {path} ({img.width}x{img.height})")
        if args.save_bits:
            print(f"saved bits: {save_bits_file(bits_file_path(path), r.bits(), r.ar_height, r.ar_width, r.prompt)}")
    return paths


def load_models(model: str, dtype, device: str, attn_impl: str = "sdpa"):
    """The AR policy and the decoder from one checkpoint root; ``tiny`` is written once into the user cache."""
    from uniar_ray.decoder import UniARDecoder
    from uniar_ray.decoder.tiny import cached_tiny_checkpoint
    from uniar_ray.model import UniARPolicy

    root = cached_tiny_checkpoint() if model == "tiny" else Path(model)
    check_model_files(root)
    print(f"loading model: {root}", file=sys.stderr)
    return (UniARPolicy.from_pretrained(root, dtype=dtype, device=device, attn_impl=attn_impl),
            UniARDecoder.from_pretrained(root, dtype=dtype, device=device))


def check_model_files(root: Path, decoder: bool = True) -> None:
    """What jobs.eval checks before it loads (the same calls): every weight file whole, config.json readable, the
    tokenizer files there, and with ``decoder`` the decoder's folders: a damaged checkpoint is one line naming the
    file, not a traceback from deep in a loader."""
    from uniar_ray.limits import ModelLimits
    from uniar_ray.model.loading import check_weight_files, resolve_ar_folder

    if decoder:
        from uniar_ray.decoder.loading import resolve_components

        resolve_components(root)
    check_weight_files(root if decoder else resolve_ar_folder(root))
    ModelLimits.load(str(root), root if decoder else None)


class StepBar:
    """A tqdm bar as an ``on_step(i, n)`` callback (one tick per step)."""

    def __init__(self, total: int, desc: str, disable: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True)

    def __enter__(self):
        return lambda i, n: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


if __name__ == "__main__":
    from jobs import entry

    entry.run(main, "generate")
