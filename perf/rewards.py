"""Reward throughput on CPU: images/s of each reward in-process, then one batch through the Ray reward actors with
all rewards in parallel vs one after another (what the reference trainer does), twice: the CPU-bound rewards here
(on 2 cores they compete for the same cores), and latency-bound stand-ins (programmatic rewards that wait
``--latency`` s per call, as a reward whose model runs elsewhere, e.g. on its own GPU, looks to the driver).

    python -m perf.rewards                 # batch 16 at 512x512 (the RL image size), best of 3 repeats
    python -m perf.rewards --quick         # batch 4 at 256x256, 1 repeat
OCR is the real RapidOCR; GenEval, HPS, PickScore and the judge run seeded *tiny* models (no weights can be
downloaded here), so their figures measure the plumbing around a model, not a real model. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time


def _images(n: int, size: int):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    font = ImageFont.load_default(size=max(12, size // 10))
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // 4 + 190)
        ImageDraw.Draw(img).text((size // 16, size // 2), f"SALE {i}", fill="black", font=font)
        out.append(np.asarray(img))
    return out


def _config(judge_tokens: int):
    from uniar_ray.config import RewardConfig, from_dict

    every = {"tasks": ["bench"], "num_cpus": 0.25}  # every sample is scored by every reward
    models = {
        "ocr": dict(every),
        "geneval": dict(every, model_path="tiny", clip_path="tiny"),
        "hps": dict(every, model_path="tiny"),
        "pickscore": dict(every, model_path="tiny"),
        "judge": dict(every, model_path="tiny", max_new_tokens=judge_tokens, missing_score="zero"),
        "brightness": dict(every),
    }
    return from_dict(RewardConfig, {"models": models})


def _config_latency(latency: float):
    from uniar_ray.config import RewardConfig, from_dict

    every = {"kind": "brightness", "tasks": ["bench"], "num_cpus": 0.25, "delay_s": latency}
    return from_dict(RewardConfig, {"models": {f"remote{i}": dict(every) for i in range(4)}})


def _ray_modes(group, images, prompts, tasks, metadata, repeats: int) -> dict:
    """Seconds per batch with the rewards one after another and all in parallel (modes alternate, best of
    ``repeats`` each, so that load from other processes hits both alike), and each reward's own time."""
    try:
        group.wait_ready()
        group.score(images[:2], prompts[:2], tasks[:2], metadata[:2])  # warm-up
        out = {"sequential_s": math.inf, "parallel_s": math.inf}
        for _ in range(repeats):
            for mode in ("sequential", "parallel"):
                t0 = time.perf_counter()
                routed = group.score(images, prompts, tasks, metadata, parallel=mode == "parallel")
                seconds = time.perf_counter() - t0
                if seconds < out[f"{mode}_s"]:
                    out[f"{mode}_s"] = round(seconds, 3)
                    out[f"{mode}_per_reward_s"] = {k.split("/")[1]: round(v, 3) for k, v in routed.metrics.items()
                                                   if k.endswith("/time_s")}
        out["parallel_speedup"] = round(out["sequential_s"] / out["parallel_s"], 2)
        out["parallel_images_per_s"] = round(len(images) / out["parallel_s"], 2)
        out["failures"] = {k: v for k, v in group.failures.items() if v}
        return out
    finally:
        group.shutdown()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--judge-tokens", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.5, help="per-call wait of the latency-bound stand-ins")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats = 4, 256, 1
    logging.basicConfig(level=logging.WARNING)

    import ray

    from actors.reward_models import RewardGroup
    from rewards.base import RewardBatch
    from rewards.router import build_reward

    cfg = _config(args.judge_tokens)
    images = _images(args.batch, args.size)
    prompts = [f'a poster that says "SALE {i}"' for i in range(args.batch)]
    tasks = ["bench"] * args.batch
    metadata = [{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}] * args.batch
    batch = RewardBatch(images, prompts, tasks, metadata)

    # 1. Each reward alone, in this process (after one warm-up call).
    in_process = {}
    for name, spec in cfg.models.items():
        model = build_reward(name, spec)
        model.score(batch.select(range(min(2, args.batch))))
        best = math.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.score(batch)
            best = min(best, time.perf_counter() - t0)
        in_process[name] = round(args.batch / best, 2)
        del model

    # 2. The Ray actors: all rewards in parallel vs one after another.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cpu_bound = _ray_modes(RewardGroup(cfg), images, prompts, tasks, metadata, args.repeats)
        stand_ins = _config_latency(args.latency)
        latency_bound = _ray_modes(RewardGroup(stand_ins), images, prompts, tasks, metadata, args.repeats)
    finally:
        ray.shutdown()

    result = {
        "batch": args.batch, "image_size": args.size, "repeats": args.repeats, "cpus": os.cpu_count(),
        "in_process_images_per_s": in_process,
        "ray_cpu_bound": cpu_bound,
        "ray_latency_bound": dict(latency_bound, rewards=len(stand_ins.models), latency_s=args.latency),
        "models": "ocr: real RapidOCR; geneval/hps/pickscore/judge: tiny seeded models; brightness: programmatic",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
