"""Weight sync cost: bytes through the driver per sync (old: state fetched into the driver and put back; new: a
reference from trainer rank 0) and the sync time as a share of the GRPO step, at the tiny model and at ~100M.

    python -m perf.weight_sync [--sizes tiny,100m] [--steps 4] [--extra grpo.beta=0.0 ...]
Each size runs a few GRPO steps (configs/grpo_demo.yaml, small batch) through ``jobs.grpo``'s Parts in one local
Ray session, then times both sync paths on the same actors. The first step (warm-up) is left out of the medians.
Bytes are the serialized size of what the driver fetches (``ray.get``) plus what it puts (``ray.put``). Last line:
JSON.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import tempfile
import time

import ray

OVERRIDES = ["data.prompts_per_step=2", "grpo.num_generations=4", "trainer.micro_batch_size=4",
             "decoder.max_batch=8", "grpo.decode_num_inference_steps=2", "rewards.models.ocr.weight=0.0"]


def write_100m_checkpoint(folder: str) -> str:
    """The tiny model's structure at hidden 768, 14 backbone layers: ~102M trainable parameters (fp32)."""
    from uniar_ray.model.tiny import build_tiny_policy, tiny_config

    cfg = tiny_config(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                      num_key_value_heads=4, head_dim=64)
    cfg.vision_config.out_hidden_size = 768
    build_tiny_policy(0, cfg).save_pretrained(folder)
    return folder


def driver_sync(parts, version: int) -> int:
    """The old path: the full state into the driver, then put back for the engines. Returns bytes moved."""
    state = parts.trainer.trainable_state()
    ref = ray.put(state)
    ray.get(parts.rollout_group.broadcast("update_weights", ref, version))
    return 2 * len(pickle.dumps(state, protocol=5))


def reference_sync(parts, version: int) -> int:
    """The new path (``Parts.sync_weights``): the driver only holds the reference. Returns bytes moved."""
    parts.sync_weights(version)
    return len(pickle.dumps(parts.weights, protocol=5))  # the Weights object the driver fetched (a reference)


def measure(size: str, model_path: str, steps: int, extra: list[str]) -> dict:
    from jobs import grpo as job
    from uniar_ray.config import GRPORunConfig, load_config

    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml",
                      OVERRIDES + [f"model.path={model_path}", f"steps={steps + 2}", *extra])
    parts = job.Parts(cfg)
    try:
        rows = [job.grpo_step(cfg, parts, s, None)[0] for s in range(steps)][1:]
        out = {"size": size, "step_time_s": statistics.median(r["step_time_s"] for r in rows),
               "sync_s": statistics.median(r["time/sync"] for r in rows)}
        out["sync_share"] = out["sync_s"] / out["step_time_s"]
        for name, fn in (("old", driver_sync), ("new", reference_sync)):
            times, moved = [], 0
            for k in range(3):
                t0 = time.perf_counter()
                moved = fn(parts, steps + k)
                times.append(time.perf_counter() - t0)
            out[f"{name}_sync_s"] = statistics.median(times)
            out[f"{name}_driver_bytes"] = moved
        state = parts.trainer.trainable_state()
        out["trainable_params"] = sum(v.numel() for v in state.values())
        out["trainable_mb"] = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    finally:
        parts.close()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,100m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides, e.g. grpo.beta=0.0 to save memory")
    a = ap.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            path = "tiny" if size == "tiny" else write_100m_checkpoint(f"{tmp}/ar_model")
            res = measure(size, path, a.steps, a.extra)
            print(json.dumps(res), flush=True)
            results.append(res)
    ray.shutdown()
    print(json.dumps({"bench": "weight_sync", "steps": a.steps, "extra": a.extra, "results": results}))


if __name__ == "__main__":
    main()
