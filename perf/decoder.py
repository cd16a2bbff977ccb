"""Decoder throughput on CPU with the tiny decoder: one batched call of 8 vs one image per call (what the reference
decode server does), and the Ray decoder pool with 1 vs 2 actors.

    python -m perf.decoder                  # AR 64x64, best of 3, both settings below
    python -m perf.decoder --quick          # 1 repeat, fewer steps
Settings: ``rl_server`` = the reference RL decode server's launch values (14 steps, no CFG, output at the AR size);
``library`` = ``decode()``'s defaults (28 steps, guidance 1.5, ratio 2). Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import time


SETTINGS = {"rl_server": dict(num_inference_steps=14, guidance_scale=1.0, upsampling_ratio=1.0),
            "library": dict(num_inference_steps=28, guidance_scale=1.5, upsampling_ratio=2.0)}


def _in_process(decoder, setting: dict, repeats: int, batch: int) -> dict:
    from uniar_ray.decoder.tiny import random_bits

    bits = random_bits(batch, 64, 64, seed=0)
    seeds = list(range(batch))
    kw = dict(ar_height=64, ar_width=64, **setting)
    decoder.decode(bits[:1], seeds=[0], **kw)  # warm-up

    def batched():
        decoder.decode(bits, seeds=seeds, **kw)

    def per_call():
        for i in range(batch):
            decoder.decode(bits[i:i + 1], seeds=[i], **kw)

    best = {"batched": float("inf"), "one_per_call": float("inf")}
    for _ in range(repeats):  # alternate the modes so a load spike hits both
        for name, fn in (("batched", batched), ("one_per_call", per_call)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    ips = {k: round(batch / v, 2) for k, v in best.items()}
    return {"images_per_s": ips, "seconds": {k: round(v, 3) for k, v in best.items()},
            "batching_speedup": round(ips["batched"] / ips["one_per_call"], 2)}


def _pool(setting: dict, repeats: int, num_actors: int, images: int, batch: int) -> dict:
    from actors.decoder_pool import DecoderPool
    from uniar_ray.config import DecoderConfig
    from uniar_ray.decoder import DecodeRequest
    from uniar_ray.decoder.tiny import random_bits

    cfg = DecoderConfig(path="tiny", num_actors=num_actors, num_cpus=1, num_threads=1, max_batch=batch,
                        max_inflight_per_actor=2, **setting)
    pool = DecoderPool(cfg)
    try:
        pool.wait_ready(timeout_s=600)
        bits = random_bits(images, 64, 64, seed=1)
        reqs = [DecodeRequest.from_bits(bits[i], 64, 64, seed=i) for i in range(images)]
        warm = [pool.submit(reqs[i:i + 1], num_inference_steps=1) for i in range(num_actors)]  # one per actor
        for ticket in warm:
            pool.collect(ticket)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = pool.decode_requests(reqs)
            best = min(best, time.perf_counter() - t0)
            if not all(r.ok for r in res):
                raise RuntimeError(f"pool failures: {[r.error for r in res if not r.ok][:3]}")
        return {"actors": num_actors, "images": images, "seconds": round(best, 3),
                "images_per_s": round(images / best, 2)}
    finally:
        pool.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in-process (default: both cores)")
    ap.add_argument("--skip-pool", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from uniar_ray.decoder import UniARDecoder

    repeats, batch = (1, 8) if a.quick else (3, 8)
    settings = {k: dict(v, num_inference_steps=4 if a.quick else v["num_inference_steps"]) for k, v in SETTINGS.items()}
    out = {"bench": "decoder", "model": "tiny (seeded), fp32, CPU", "ar_size": 64, "batch": batch,
           "threads_in_process": a.threads, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
           "settings": settings, "in_process": {}}
    torch.set_num_threads(a.threads)
    decoder = UniARDecoder.tiny(seed=0, dtype=torch.float32, max_batch=batch)
    for name, setting in settings.items():
        out["in_process"][name] = _in_process(decoder, setting, repeats, batch)
        print(json.dumps({name: out["in_process"][name]}), flush=True)
    if not a.skip_pool:
        import ray

        from jobs import init_local_ray  # a token of its own: never ~/.ray/auth_token

        init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:  # one thread per actor, the RL server setting, 4 calls of 8
            one = _pool(settings["rl_server"], repeats, 1, 4 * batch, batch)
            print(json.dumps(one), flush=True)
            two = _pool(settings["rl_server"], repeats, 2, 4 * batch, batch)
            print(json.dumps(two), flush=True)
        finally:
            ray.shutdown()
        out["pool"] = {"one_actor": one, "two_actors": two,
                       "two_vs_one": round(two["images_per_s"] / one["images_per_s"], 2)}
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
