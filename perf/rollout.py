"""Rollout throughput: the KV-cached torch engine and the vLLM engine vs the reference's generation loop (visual-
decoder stack recomputed over the whole sequence at every step; see ``ENGINES``), same weights, side by side in one run.

    python -m perf.rollout                 # bench config, batch 8, N = 64 and 256 (+ N = 900 at batch 2), fp32 + bf16
    python -m perf.rollout --quick         # N = 64 only, fp32
    python -m perf.rollout --vllm --threads 1 --vllm-requests 16   # + every engine on the same 16 concurrent
                                           # requests at N = 256 and the step time at N = 900 (batch 2), fp32
    python -m perf.rollout --vllm-only --threads 1 --vllm-requests 16   # only that section
    python -m perf.rollout --vllm-only --quick   # that section at N = 64 only (a check that it runs)
Each (engine, N, dtype) runs in a fresh process so its peak RSS is its own. Last line: one JSON object whose
``ratios`` include ``best_over_reference_n256_b<R>``, ``cached_over_reference_n256_b<R>`` and
``best_over_reference_our_kernels_n256_b<R>``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

SIDE = {64: (256, 256), 256: (512, 512), 900: (960, 960)}
# The torch engines. "reference" is the reference's generation loop on our model code: the visual stack recomputed
# over the whole sequence every step, its layers as it runs them (separate q/k/v, gate/up and o/down projections
# through F.linear, i.e. MKL's sgemm) and its sampler (softmax + torch.multinomial per bit). "reference_our_kernels"
# is the same loop on the cached engine's kernels (fused projections, oneDNN-prepacked weights for decode-sized
# inputs, MKL for the recompute's large ones): the algorithm's share of the speed-up alone.
ENGINES = {"cached": {},
           "reference": {"recompute_visual_stack": True, "fuse": False, "multinomial_sampler": True},
           "reference_our_kernels": {"recompute_visual_stack": True, "multinomial_sampler": True}}


def _measure(engine_kind: str, n: int, batch: int, dtype: str, threads: int) -> dict:
    import torch

    from uniar_ray.model.tiny import bench_config, build_tiny_policy
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    torch.set_num_threads(threads)
    policy = build_tiny_policy(0, bench_config(), dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    engine = TorchRolloutEngine(policy, max_batch=batch, **ENGINES[engine_kind])
    h, w = SIDE[n]
    reqs = [GenerationRequest(f"prompt number {i} with a few words", h, w, seed=i) for i in range(batch)]
    engine.generate([GenerationRequest("warm up", 64, 64)])
    t0 = time.perf_counter()
    engine.generate(reqs)
    seconds = time.perf_counter() - t0
    steps = engine.last_step_seconds
    out = {"engine": engine_kind, "n": n, "batch": batch, "dtype": dtype, "seconds": round(seconds, 3),
           "tokens_per_s": round(n * batch / seconds, 1), "ms_per_step": round(1000 * seconds / n, 2),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if n > 250:
        out["step10_ms"] = round(1000 * steps[10], 2)
        out["step250_ms"] = round(1000 * steps[250], 2)
    return out


def _measure_vllm(n: int, requests: int, conn) -> None:
    """The vLLM engine on the bench config: ``requests`` concurrent requests (max_num_seqs = requests), fp32."""
    import os
    import tempfile

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep vLLM's start-up log off this script's stdout
    from pathlib import Path

    from uniar_ray.model.tiny import bench_config, write_tiny_checkpoint
    from uniar_ray.rollout import GenerationRequest
    from uniar_ray.rollout.vllm_engine import VLLMRolloutEngine

    folder = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="uniar-bench-")) / "ar_model", 0, bench_config())
    t0 = time.perf_counter()
    engine = VLLMRolloutEngine(folder, max_batch=requests, kvcache_gib=1.0, max_model_len=128 + n)
    start_s = time.perf_counter() - t0
    h, w = SIDE[n]
    reqs = [GenerationRequest(f"prompt number {i} with a few words", h, w, seed=i) for i in range(requests)]
    engine.generate([GenerationRequest("warm up", 64, 64)])
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    seconds = time.perf_counter() - t0
    bad = [r for r in out if not hasattr(r, "bits_shape") or r.bits_shape[0] != n]
    engine.close()
    if bad:
        raise RuntimeError(f"vLLM engine: {len(bad)} of {requests} requests failed, e.g. {bad[0]}")
    conn.send({"engine": "vllm", "n": n, "batch": requests, "dtype": "fp32", "seconds": round(seconds, 3),
               "tokens_per_s": round(n * requests / seconds, 1), "ms_per_step": round(1000 * seconds / n, 2),
               "engine_start_s": round(start_s, 1),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
               "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024})


def _run_vllm(n: int, requests: int) -> dict:
    # Not a Pool: vLLM spawns its own EngineCore and worker processes, which a daemonic pool worker may not.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_measure_vllm, args=(n, requests, child))
    proc.start()
    row = parent.recv()
    proc.join()
    return row


def _vllm_section(requests: int, threads: int, quick: bool, n900_batch: int, skip_reference_900: bool,
                  rows: list, ratios: dict) -> dict:
    """Every engine on the same requests and seeds, fp32: ``requests`` concurrent at N = 256 (the throughput
    comparison), then N = 900 at ``n900_batch`` (the step time). Returns the summary printed before the JSON."""
    summary = {}
    for n, batch in ((64, requests),) if quick else ((256, requests), (900, n900_batch)):
        runs = {"vllm": _run_vllm(n, batch), "cached": _run(("cached", n, batch, "fp32", threads))}
        if not (n == 900 and skip_reference_900):
            runs["reference"] = _run(("reference", n, batch, "fp32", threads))
        if n == 256:
            runs["reference_our_kernels"] = _run(("reference_our_kernels", n, batch, "fp32", threads))
        for row in runs.values():
            rows.append(row)
            print(json.dumps(row), flush=True)
        summary[f"step_ms_n{n}_b{batch}"] = {kind: row["ms_per_step"] for kind, row in runs.items()}
        if "reference" not in runs:
            continue
        tag = f"n{n}_b{batch}"
        ref = runs["reference"]["tokens_per_s"]
        best = max(("vllm", "cached"), key=lambda kind: runs[kind]["tokens_per_s"])
        ratios[f"vllm_over_cached_{tag}"] = round(runs["vllm"]["tokens_per_s"] / runs["cached"]["tokens_per_s"], 2)
        ratios[f"vllm_over_reference_{tag}"] = round(runs["vllm"]["tokens_per_s"] / ref, 2)
        ratios[f"cached_over_reference_{tag}"] = round(runs["cached"]["tokens_per_s"] / ref, 2)
        ratios[f"best_over_reference_{tag}"] = round(runs[best]["tokens_per_s"] / ref, 2)
        if "reference_our_kernels" in runs:
            ratios[f"best_over_reference_our_kernels_{tag}"] = round(
                runs[best]["tokens_per_s"] / runs["reference_our_kernels"]["tokens_per_s"], 2)
        summary[f"best_engine_{tag}"] = best
        print(f"N={n}, {batch} concurrent requests: best engine {best} at {ratios[f'best_over_reference_{tag}']}x "
              f"the reference (torch engine {ratios[f'cached_over_reference_{tag}']}x, vLLM "
              f"{ratios[f'vllm_over_reference_{tag}']}x)" + (
                  f"; {ratios[f'best_over_reference_our_kernels_{tag}']}x the same loop on our kernels"
                  if "reference_our_kernels" in runs else ""), flush=True)
    for key, steps in summary.items():
        if key.startswith("step_ms"):
            print(f"{key}: " + ", ".join(f"{kind} {ms} ms" for kind, ms in steps.items()), flush=True)
    return summary


def _run(args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference-900", action="store_true", help="the no-cache N=900 run takes minutes")
    ap.add_argument("--vllm", action="store_true", help="add the vLLM section: every engine at N = 256 and 900 (fp32)")
    ap.add_argument("--vllm-requests", type=int, default=16, help="concurrent requests at N = 256 in that section")
    ap.add_argument("--vllm-n900-batch", type=int, default=2, help="concurrent requests at N = 900 in that section")
    ap.add_argument("--vllm-only", action="store_true", help="run only the vLLM section")
    a = ap.parse_args(argv)
    plan = [] if a.vllm_only else [(64, 8)] if a.quick else [(64, 8), (256, 8), (900, 2)]
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
    summary = {}
    if a.vllm or a.vllm_only:
        summary = _vllm_section(a.vllm_requests, a.threads, a.quick, a.vllm_n900_batch, a.skip_reference_900, rows,
                                ratios)
    print(json.dumps({"bench": "rollout", "threads": a.threads, "ratios": ratios, **summary, "runs": rows}))


if __name__ == "__main__":
    main()
