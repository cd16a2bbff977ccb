"""Per-step overhead of the torch rollout engine on CPU: operators per AR step and ms per step, for each change.

    python -m perf.engine_overhead --baseline-rev fe83fa4    # vs the engine as it was at that commit

Variants, same weights and requests (bench config, N = 256, --batch, fp32), interleaved in one process:
- baseline: the engine file at --baseline-rev (masks, positions and uniforms built per step, unfused projections);
- unfused: today's engine with fuse=False (per-batch tables and masks, chunked uniforms, grouped decode attention);
- fused_mkl: q/k/v and gate/up as one matmul each, q/k normalised and rotated together, MKL's sgemm (pack=False);
- fused: today's default, the same with every projection prepacked for oneDNN (CPU);
- static: static_shapes=True (what the CUDA graph captures; on CPU it attends over the whole buffer);
- compiled: fused + compile=True (Inductor fuses each layer's elementwise work; compiles for a minute or more).
Operator counts come from torch.profiler (deterministic, unlike times on a shared machine). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N_SIDE = 512  # N = 256


def _baseline_engine(rev: str):
    """The engine module as it was at ``rev`` (imports resolved against today's package)."""
    src = subprocess.run(["git", "show", f"{rev}:uniar_ray/rollout/torch_engine.py"], check=True, text=True,
                         capture_output=True, cwd=Path(__file__).resolve().parents[1]).stdout
    src = src.replace("from .images", "from uniar_ray.rollout.images").replace("from .types", "from uniar_ray.rollout.types")
    path = Path(tempfile.mkdtemp(prefix="uniar-baseline-")) / "baseline_engine.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_engine"] = module
    spec.loader.exec_module(module)
    return module.TorchRolloutEngine


def _ops_per_step(engine, n_side: int = 256) -> float:
    from uniar_ray.rollout import GenerationRequest

    reqs = [GenerationRequest("prompt number 1 with a few words", n_side, n_side, seed=i) for i in range(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.generate(reqs)
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    return ops / ((n_side // 32) ** 2)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", help="git revision whose engine is the baseline (needs the git history)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from uniar_ray.model.tiny import bench_config, build_tiny_policy
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    torch.set_num_threads(a.threads)
    make = {"unfused": lambda p: TorchRolloutEngine(p, max_batch=a.batch, fuse=False),
            "fused_mkl": lambda p: TorchRolloutEngine(p, max_batch=a.batch, pack=False),
            "fused": lambda p: TorchRolloutEngine(p, max_batch=a.batch),
            "static": lambda p: TorchRolloutEngine(p, max_batch=a.batch, static_shapes=True),
            "compiled": lambda p: TorchRolloutEngine(p, max_batch=a.batch, compile=True)}
    if a.baseline_rev:
        old = _baseline_engine(a.baseline_rev)
        make = {"baseline": lambda p: old(p, max_batch=a.batch), **make}
    # one policy per variant: fusion rewires a policy's weights in place
    engines = {k: f(build_tiny_policy(0, bench_config())) for k, f in make.items()}
    reqs = lambda: [GenerationRequest(f"prompt number {i} with a few words", N_SIDE, N_SIDE, seed=i)  # noqa: E731
                    for i in range(a.batch)]
    times = {k: [] for k in engines}
    for e in engines.values():
        e.generate([GenerationRequest("warm up", 64, 64)])
    for _ in range(a.repeats):  # interleaved, so load on a shared machine hits every variant alike
        for k, e in engines.items():
            t0 = time.perf_counter()
            e.generate(reqs())
            times[k].append(1000 * (time.perf_counter() - t0) / (N_SIDE // 32) ** 2)
    rows = {k: {"ms_per_step": round(statistics.median(v), 2), "ops_per_step": round(_ops_per_step(engines[k]), 1)}
            for k, v in times.items()}
    for k, r in rows.items():
        print(json.dumps({"variant": k, **r}), flush=True)
    first = next(iter(rows))
    ratios = {f"{k}_over_{first}": round(rows[first]["ms_per_step"] / r["ms_per_step"], 2) for k, r in rows.items()}
    print(json.dumps({"bench": "engine_overhead", "threads": a.threads, "batch": a.batch, "n": (N_SIDE // 32) ** 2,
                      "variants": rows, "speedups": ratios}))


if __name__ == "__main__":
    main()
