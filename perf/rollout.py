"""Rollout throughput: the KV-cached torch engine vs the reference's algorithm (visual-decoder stack recomputed over
the whole sequence at every step), same weights, side by side in one run.

    python -m perf.rollout                 # bench config, batch 8, N = 64 and 256 (+ N = 900 at batch 2), fp32 + bf16
    python -m perf.rollout --quick         # N = 64 only, fp32
Each (engine, N, dtype) runs in a fresh process so its peak RSS is its own. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

SIDE = {64: (256, 256), 256: (512, 512), 900: (960, 960)}


def _measure(engine_kind: str, n: int, batch: int, dtype: str, threads: int) -> dict:
    import torch

    from uniar_ray.model.tiny import bench_config, build_tiny_policy
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    torch.set_num_threads(threads)
    policy = build_tiny_policy(0, bench_config(), dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    engine = TorchRolloutEngine(policy, max_batch=batch, recompute_visual_stack=engine_kind == "reference")
    h, w = SIDE[n]
    reqs = [GenerationRequest(f"prompt number {i} with a few words", h, w, seed=i) for i in range(batch)]
    engine.generate([GenerationRequest("warm up", 64, 64)])
    t0 = time.perf_counter()
    engine.generate(reqs)
    seconds = time.perf_counter() - t0
    steps = engine.last_step_seconds
    out = {"engine": engine_kind, "n": n, "batch": batch, "dtype": dtype, "seconds": round(seconds, 3),
           "tokens_per_s": round(n * batch / seconds, 1), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if n > 250:
        out["step10_ms"] = round(1000 * steps[10], 2)
        out["step250_ms"] = round(1000 * steps[250], 2)
    return out


def _run(args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference-900", action="store_true", help="the no-cache N=900 run takes minutes")
    a = ap.parse_args(argv)
    plan = [(64, 8)] if a.quick else [(64, 8), (256, 8), (900, 2)]
    dtypes = ["fp32"] if a.quick else ["fp32", "bf16"]
    rows, ratios = [], {}
    for dtype in dtypes:
        for n, batch in plan:
            cached = _run(("cached", n, batch, dtype, a.threads))
            rows.append(cached)
            print(json.dumps(cached), flush=True)
            if n == 900 and a.skip_reference_900:
                continue
            ref = _run(("reference", n, batch, dtype, a.threads))
            rows.append(ref)
            print(json.dumps(ref), flush=True)
            ratios[f"speedup_n{n}_{dtype}"] = round(cached["tokens_per_s"] / ref["tokens_per_s"], 2)
    print(json.dumps({"bench": "rollout", "threads": a.threads, "ratios": ratios, "runs": rows}))


if __name__ == "__main__":
    main()
