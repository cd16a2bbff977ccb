"""Eval pipeline throughput: the Ray Data stream (generation and decoder actors overlapping, the driver writing)
against a sequential loop (generate a batch, decode it, write it) with the same tiny models, settings and batch size.

    python -m perf.eval                      # 1,200 LongText-style prompts x 1 sample, AR 256x256, 2 steps, batch 8
    python -m perf.eval --prompts 64 --memory-prompts 0     # a quick check
Also the pipeline's fixed start-up (Ray Data + both actor pools' model loads + the first batch) and peak memory of a
2,000-prompt run (driver and Ray workers, sampled). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from jobs import eval as eval_job
from uniar_ray.config import EvalConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, n: int) -> Path:
    """LongText-style records (meta.prompt_id) with varied wording; the writer only needs the id."""
    words = ["red", "wooden", "sign", "poster", "reading", "OPEN", "late", "city", "glass", "blue", "label", "cafe"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(4 + i % 7))
            f.write(json.dumps({"idx": i, "prompt": f"A photo of a {text}", "meta": {"prompt_id": i}}) + "\n")
    return path


def make_config(prompts: Path, out: Path, args, n: int) -> EvalConfig:
    return load_config(EvalConfig, REPO / "configs/eval/longtext.yaml", [
        f"benchmark.prompt_file={prompts}", f"benchmark.limit={n}", "benchmark.samples_per_prompt=1",
        f"settings.ar_height={args.ar}", f"settings.ar_width={args.ar}", "settings.upsampling_ratio=1.0",
        f"settings.num_inference_steps={args.steps}", f"batch_size={args.batch}", f"rollout.max_batch={args.batch}",
        f"decoder.max_batch={args.batch}", f"out_dir={out}", f"tiny_cache={args.tiny_cache}", "scoring.enabled=false",
        "preview_prompts=0", f"progress={str(args.progress).lower()}"])


class MemorySampler:
    """Peak RSS of the driver and of all Ray worker processes together (``ray::`` processes), every 0.5 s."""

    def __init__(self):
        self.driver = self.workers = 0
        self.trace: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me, t0 = psutil.Process(), time.perf_counter()
        while not self._stop.is_set():
            workers = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and p.info["memory_info"]:
                    workers += p.info["memory_info"].rss
            driver = me.memory_info().rss
            self.driver, self.workers = max(self.driver, driver), max(self.workers, workers)
            self.trace.append((time.perf_counter() - t0, driver, workers))
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sequential(cfg: EvalConfig, threads: int) -> dict:
    """Same models, settings and batch size in one process: generate, decode, write. ``threads``: torch threads
    (1 is this loop's best on the shared 2-core machines: with 2, OpenMP threads spin-wait on cores other jobs hold,
    and a batch took 10-100x longer when measured)."""
    import torch
    from PIL import Image

    from uniar_ray.decoder import DecodeRequest, UniARDecoder
    from uniar_ray.model.factory import load_policy
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    torch.set_num_threads(threads)

    plan = eval_job.make_plan(cfg)
    s, by_idx = plan.settings, {r.idx: r for r in plan.records}
    t0 = time.perf_counter()
    engine = TorchRolloutEngine(load_policy(str(plan.model_root)), max_batch=cfg.batch_size)
    decoder = UniARDecoder.from_pretrained(plan.decoder_root, dtype=torch.float32, max_batch=cfg.batch_size)
    load_s = time.perf_counter() - t0
    stages = {"generate": 0.0, "decode": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    for start in range(0, len(plan.rows), cfg.batch_size):
        rows = plan.rows[start:start + cfg.batch_size]
        t = time.perf_counter()
        rollouts = engine.generate([GenerationRequest(r["prompt"], s.ar_height, s.ar_width, seed=r["seed"],
                                                      temperature=s.temperature, cfg_scale=s.cfg_scale,
                                                      cfg_mode=s.cfg_mode, return_logprobs=False) for r in rows])
        t, stages["generate"] = time.perf_counter(), stages["generate"] + time.perf_counter() - t
        images = decoder.decode_requests([DecodeRequest.from_rollout(x) for x in rollouts], s.upsampling_ratio,
                                         s.num_inference_steps, s.guidance_scale)
        t, stages["decode"] = time.perf_counter(), stages["decode"] + time.perf_counter() - t
        for row, res in zip(rows, images):
            plan.writer.write_sample(by_idx[row["idx"]], row["k"], Image.fromarray(res.image))
        stages["write"] += time.perf_counter() - t
    seconds = time.perf_counter() - t0
    return {"images": len(plan.rows), "seconds": round(seconds, 2), "images_per_s": round(len(plan.rows) / seconds, 3),
            "model_load_s": round(load_s, 2), "stage_s": {k: round(v, 2) for k, v in stages.items()},
            "torch_threads": torch.get_num_threads()}


def pipeline(cfg: EvalConfig) -> dict:
    with MemorySampler() as mem:
        r = eval_job.run(cfg)
    return {"images": r["samples_written"], "failed": r["samples_failed"], "seconds": r["seconds"],
            "images_per_s": r["images_per_s"], "startup_s": r["startup_s"],
            "steady_images_per_s": r["steady_images_per_s"],
            "peak_driver_rss_mib": mem.driver >> 20, "peak_workers_rss_mib": mem.workers >> 20,
            "rss_trace_mib": [(round(t), d >> 20, w >> 20) for t, d, w in mem.trace[:: max(1, len(mem.trace) // 8)]]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=1200, help="prompts (1 sample each) of the throughput runs")
    parser.add_argument("--memory-prompts", type=int, default=2000, help="prompts of the memory run (0: skip)")
    parser.add_argument("--ar", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="decoder steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-threads", type=int, default=1, help="torch threads of the sequential loop")
    parser.add_argument("--tiny-cache", default=str(REPO / "runs/.tiny_checkpoint"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="uniar-perf-eval-"))
    prompts = write_prompts(tmp / "prompts.jsonl", max(args.prompts, args.memory_prompts))
    t0 = time.perf_counter()
    from jobs import init_local_ray  # a token of its own: never ~/.ray/auth_token

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {"ray_init_s": round(time.perf_counter() - t0, 2), "prompts": args.prompts, "ar": args.ar,
           "decoder_steps": args.steps, "batch": args.batch, "cpus": psutil.cpu_count(),
           "load_avg_start": [round(x, 1) for x in psutil.getloadavg()]}
    out["pipeline"] = pipeline(make_config(prompts, tmp / "pipeline", args, args.prompts))
    out["sequential"] = sequential(make_config(prompts, tmp / "sequential", args, args.prompts), args.seq_threads)
    p, s = out["pipeline"], out["sequential"]
    out["speedup"] = round(p["images_per_s"] / s["images_per_s"], 3)  # pipeline wall time includes its start-up
    if p["steady_images_per_s"]:
        out["speedup_steady"] = round(p["steady_images_per_s"] / s["images_per_s"], 3)
    if args.memory_prompts:
        mem_cfg = make_config(prompts, tmp / "memory", args, args.memory_prompts)
        out["memory"] = {"prompts": args.memory_prompts, **pipeline(mem_cfg)}
    out["load_avg_end"] = [round(x, 1) for x in psutil.getloadavg()]
    ray.shutdown()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
