"""Ask a UniAR model about an image and print its answer (the reference's inference/chat.py: greedy, chat template).

    python -m jobs.chat --image apple.png --prompt "What is this?"                 # tiny seeded model, CPU
    python -m jobs.chat --model_path /ckpt/UniAR --image https://example.com/demo.jpeg --prompt "Describe this image."
    python -m jobs.chat --model /ckpt/UniAR --image apple.png --prompt "Describe this image." --dtype bfloat16 --attn eager
    python -m jobs.chat --bits apple.bits.npz --prompt "What is this?"              # straight from generated bits
    ray job submit --working-dir . -- python -m jobs.chat --model /ckpt/UniAR --image apple.png --prompt "..."

--bits reads the file ``jobs.generate --save-bits`` writes and feeds those bits to the model as the image, without
decoding them to pixels or encoding pixels again (the shared context of a unified model).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from uniar_ray.image_source import MAX_BYTES, TIMEOUT_S, open_image_source
from uniar_ray.model.factory import DTYPES, usable_attn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The reference's chat.py options and defaults (``--model_path``, ``--max_new_tokens 1024``, ``--attn
    flash_attention_2`` falling back to eager without CUDA), each also hyphenated; ``--model`` defaults to tiny."""
    ap = argparse.ArgumentParser(prog="python -m jobs.chat", description=__doc__.split("\n")[0])
    ap.add_argument("--model", "--model_path", "--model-path", dest="model", default="tiny",
                    help="AR model folder (config.json with model_type uniar, or a root with ar_model/); "
                         "'tiny' (default) builds and caches the seeded tiny model")
    ap.add_argument("--image", help="the picture to ask about (PNG/JPEG): a local file or an http(s) URL "
                                    f"(at most {MAX_BYTES // 2**20} MiB, {TIMEOUT_S:g} s)")
    ap.add_argument("--bits", help="a bits file from jobs.generate --save-bits, used as the image instead")
    ap.add_argument("--prompt", required=True, help="the question")
    ap.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=1024,
                    help="answer length limit (chat.py's default: 1024)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="bfloat16 computes as the reference's chat.py does after model.to(bfloat16): rotary tables "
                         "rounded to bf16 (bit-identical logits with the same attention backend)")
    ap.add_argument("--attn", default="flash_attention_2", choices=["flash_attention_2", "sdpa", "eager"],
                    help="attention kernels, chat.py's choices and default; flash_attention_2 needs CUDA and the "
                         "flash-attn package: without CUDA eager is used (as chat.py does), without the package sdpa")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tiny model (with --model tiny)")
    args = ap.parse_args(argv)
    if (args.image is None) == (args.bits is None):
        ap.error("give exactly one of --image FILE_OR_URL or --bits FILE")
    if args.max_new_tokens < 1:
        ap.error(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from uniar_ray.bits import load_bits_file
    from uniar_ray.model import UniARPolicy, resolve_ar_folder
    from uniar_ray.model.chat import ChatProcessor

    from jobs.generate import check_model_files

    # the picture first: a missing file or a URL that does not answer is reported before the model loads
    picture = open_image_source(args.image)[1] if args.image else None
    root = _model_root(args.model, args.seed)
    check_model_files(root, decoder=False)  # a damaged checkpoint: one line naming the file
    folder = resolve_ar_folder(root)
    dtype = DTYPES[args.dtype]
    attn, note = usable_attn(args.attn, args.device)
    if note:
        print(f"[chat] {note}", file=sys.stderr)
    policy = UniARPolicy.from_pretrained(folder, dtype=dtype, device=args.device, attn_impl=attn,
                                         bf16_rope_tables=dtype == torch.bfloat16)
    if policy.tokenizer is None:
        raise SystemExit(f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    processor = ChatProcessor.from_pretrained(folder, policy.tokenizer, policy.config.vision_config)
    if args.bits:
        inputs = processor([args.prompt], bits=[load_bits_file(args.bits)])
    else:
        inputs = processor([args.prompt], images=[picture])
    ids = policy.generate_text(**inputs.model_kwargs(), max_new_tokens=args.max_new_tokens)
    answer = processor.decode(ids)[0]
    print(answer)
    return answer


def _model_root(model: str, seed: int) -> Path:
    if model != "tiny":
        return Path(model)
    from uniar_ray.decoder.tiny import cached_tiny_checkpoint

    return cached_tiny_checkpoint(seed)


if __name__ == "__main__":
    from jobs import entry

    entry.run(main, "chat")
