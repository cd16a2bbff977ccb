"""Reward throughput on CPU: images/s of each reward in-process, then one batch through the Ray reward actors with
all rewards in parallel vs one after another (what the reference trainer does), twice: the CPU-bound rewards here
(on 2 cores they compete for the same cores), and latency-bound stand-ins (programmatic rewards that wait
``--latency`` s per call, as a reward whose model runs elsewhere, e.g. on its own GPU, looks to the driver).

    python -m perf.rewards                 # batch 16 at 512x512 (the RL image size), best of 3 repeats
    python -m perf.rewards --quick         # batch 4 at 256x256, 1 repeat
OCR is the real RapidOCR; GenEval, HPS, PickScore and the judge run seeded *tiny* models (no weights can be
downloaded here), so their figures measure the plumbing around a model, not a real model. Last line: one JSON object.

    python -m perf.rewards --self-judge    # self_judge on bits vs decode + the same model judging the pixels
    python -m perf.rewards --self-judge --model /ckpt/UniAR --device cuda --dtype bfloat16 \
        --prompts my_prompts.jsonl --judge-model /ckpt/UnifiedReward-2.0-qwen3vl-32b     # agreement on your data
--self-judge rolls out ``--batch`` prompts, then scores the same bits two ways, side by side: self_judge (the bits
as the image, no decoding) and decode (``--decode-steps``) + the same policy answering the same question from the
decoded pixels (its vision tower), so both judges have the same size. It reports images/s of each and their rank
agreement (Spearman); with ``--judge-model`` also the UnifiedReward judge's scores on the pixels (JPEG 95, as the
reference sent them) and self_judge's rank agreement with it.
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
    parser.add_argument("--self-judge", action="store_true", help="self_judge vs decode + judge (see above)")
    parser.add_argument("--model", default="tiny", help="--self-judge: UniAR checkpoint root, or tiny")
    parser.add_argument("--judge-model", default="", help="--self-judge: also a UnifiedReward judge folder (or tiny)")
    parser.add_argument("--prompts", default="", help="--self-judge: a JSONL of prompts (default: built-in ones)")
    parser.add_argument("--decode-steps", type=int, default=14, help="the RL default (grpo.decode_num_inference_steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.self_judge:
        return self_judge_vs_decode(args)
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
    from jobs import init_local_ray  # a token of its own: never ~/.ray/auth_token

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
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


# ---------------------------------------------------------------------------------------------------------------
# self_judge (bits) vs decode + judge (pixels)
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = ["a red apple on a wooden table", "a lighthouse on a rocky cliff at sunset", "two cats on a sofa",
           'a poster that says "SALE"', "a blue car in the snow", "a bowl of ramen, top view", "three yellow tulips",
           "a robot reading a book"]


def _prompts(path: str, n: int) -> list[str]:
    if not path:
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    from uniar_ray.data import load_dataset

    records = load_dataset(path).records
    return [records[i % len(records)].prompt for i in range(n)]


def _best(fn, repeats: int):
    """(best seconds, last result) over ``repeats`` calls."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _timed(fn):
    """(wall seconds, this process's CPU seconds, result): on a machine other jobs load, the CPU seconds are the
    steadier measure of the work itself (the wall clock also counts the time other processes had the cores)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def spearman(a, b) -> float:
    import numpy as np

    ra, rb = (np.argsort(np.argsort(np.asarray(x))) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(ra) > 1 else math.nan


def self_judge_vs_decode(args) -> dict:
    if args.quick:
        args.batch, args.size, args.repeats = 4, 256, 1
    logging.basicConfig(level=logging.WARNING)
    from pathlib import Path

    import numpy as np
    import torch

    from jobs.generate import load_models
    from rewards.base import PackedBits, RewardBatch
    from rewards.self_judge import SelfJudgeReward
    from uniar_ray.decoder.tiny import cached_tiny_checkpoint
    from uniar_ray.model.chat import ChatProcessor, load_chat_template
    from uniar_ray.model.loading import resolve_ar_folder
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    policy, decoder = load_models(args.model, getattr(torch, args.dtype), args.device)
    folder = resolve_ar_folder(cached_tiny_checkpoint() if args.model == "tiny" else Path(args.model))
    judge = SelfJudgeReward(policy, load_chat_template(folder, policy.tokenizer), batch_size=args.batch)
    pixel_proc = ChatProcessor.from_pretrained(folder, policy.tokenizer, policy.config.vision_config)
    prompts = _prompts(args.prompts, args.batch)
    h = w = args.size
    t0 = time.perf_counter()
    rollouts = TorchRolloutEngine(policy).generate([GenerationRequest(p, h, w, seed=i, return_logprobs=False)
                                                    for i, p in enumerate(prompts)])
    rollout_s = time.perf_counter() - t0
    bits = [PackedBits.of(r) for r in rollouts]
    questions = [judge.question_for(p, None) for p in prompts]
    batch = RewardBatch([None] * len(prompts), prompts, [None] * len(prompts), [{}] * len(prompts), bits)

    stacked = torch.stack([r.bits() for r in rollouts])

    def on_pixels(images):
        log_yes, log_no = judge.yes_no(pixel_proc(questions, images=images))
        return 1.0 / (1.0 + np.exp(log_no - log_yes))

    # warm-up (both judging paths at full batch), then best of --repeats
    judge.score(batch)
    on_pixels(decoder.decode(stacked[:1], h, w, 1.0, 1, 1.0, seeds=[0]) * len(prompts))
    stages = {"bits": lambda: judge.score(batch),
              "decode": lambda: decoder.decode(stacked, h, w, 1.0, args.decode_steps, 1.0,
                                               seeds=list(range(len(prompts)))),
              "pixels": lambda: on_pixels(got["decode"])}
    wall, cpu, got = ({k: math.inf for k in stages}, {k: math.inf for k in stages}, {})
    for _ in range(args.repeats):  # the stages alternate: load from other processes hits them alike
        for stage, fn in stages.items():
            w_s, c_s, got[stage] = _timed(fn)
            wall[stage], cpu[stage] = min(wall[stage], w_s), min(cpu[stage], c_s)
    on_bits, images, pixel_scores = got["bits"], got["decode"], got["pixels"]
    n = len(prompts)
    out = {
        "model": args.model, "batch": n, "ar_size": args.size, "decode_steps": args.decode_steps,
        "device": args.device, "dtype": args.dtype, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "rollout_s": round(rollout_s, 3),
        "wall_s": {k: round(v, 3) for k, v in wall.items()}, "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "self_judge_images_per_s": round(n / wall["bits"], 2),
        "decode_plus_judge_images_per_s": round(n / (wall["decode"] + wall["pixels"]), 2),
        "speedup_wall": round((wall["decode"] + wall["pixels"]) / wall["bits"], 2),
        "speedup_cpu": round((cpu["decode"] + cpu["pixels"]) / cpu["bits"], 2),
        "judge_speedup_cpu": round(cpu["pixels"] / cpu["bits"], 2),  # the judging alone: bits vs pixels in
        "spearman_bits_vs_pixels": round(spearman(on_bits.scores, pixel_scores), 3),
    }
    if args.judge_model:
        out.update(_external_judge(args, images, prompts, on_bits.scores))
    print(json.dumps(out))
    return out


def _external_judge(args, images, prompts, self_scores) -> dict:
    """The UnifiedReward judge on the decoded pixels as the reference sent them (JPEG 95)."""
    import numpy as np

    from rewards.base import as_sent
    from rewards.judge import JudgeReward
    from rewards.router import build_reward
    from uniar_ray.config import RewardSpec

    spec = RewardSpec(kind="judge", model_path=args.judge_model, device=args.device, dtype=args.dtype,
                      max_new_tokens=args.judge_tokens, batch_size=args.batch)
    judge: JudgeReward = build_reward("judge", spec)
    arrays = [as_sent(np.asarray(im.convert("RGB")), "jpeg", 95) for im in images]
    from rewards.base import RewardBatch

    seconds, res = _best(lambda: judge.score(RewardBatch(arrays, prompts, [None] * len(arrays), [{}] * len(arrays))),
                         1)
    return {"judge_model": args.judge_model, "judge_s": round(seconds, 3),
            "judge_images_per_s": round(len(arrays) / seconds, 2),
            "spearman_self_judge_vs_judge": round(spearman(self_scores, res.scores), 3)}


if __name__ == "__main__":
    main()
