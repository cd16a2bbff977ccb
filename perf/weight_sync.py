"""Weight sync cost, three paths side by side on the same actors: ``driver`` (the state fetched into the driver and
put back: the first implementation), ``object_store`` (``rollout.weight_sync: object_store``: rank 0 puts, the
engines pull by reference) and ``collective`` (``rollout.weight_sync: collective``: a gloo broadcast from rank 0,
actors/weight_sync.py); and the in-step sync time as a share of the GRPO step, at the tiny model and at ~100M.

    python -m perf.weight_sync [--sizes tiny,100m] [--steps 4] [--engines 1] [--extra grpo.beta=0.0 ...]
Each size runs a few GRPO steps (configs/grpo_demo.yaml, small batch, object_store sync) through ``jobs.grpo``'s
Parts in one local Ray session, then times each path (median of 3; the collective group is formed by its first,
untimed sync). The first step (warm-up) is left out of the step medians. Per path and sync: driver bytes (the
serialized size of what the driver fetches and puts) and object-store bytes (the size of every object a sync
creates, from Ray's object directory). Last line: JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import statistics
import tempfile
import time

import ray
import ray.experimental

OVERRIDES = ["data.prompts_per_step=2", "grpo.num_generations=4", "trainer.micro_batch_size=4",
             "decoder.max_batch=8", "grpo.decode_num_inference_steps=2"]


def write_100m_checkpoint(folder: str) -> str:
    """The tiny model's structure at hidden 768, 14 backbone layers: ~102M trainable parameters (fp32)."""
    from uniar_ray.model.tiny import build_tiny_policy, tiny_config

    cfg = tiny_config(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                      num_key_value_heads=4, head_dim=64)
    cfg.vision_config.out_hidden_size = 768
    build_tiny_policy(0, cfg).save_pretrained(folder)
    return folder


def _object_bytes(refs) -> int:
    """The size of objects in the object store (Ray's object directory; inline values are not stored there)."""
    locations = ray.experimental.get_object_locations(list(refs))
    return sum(loc["object_size"] or 0 for loc in locations.values())


def driver_sync(parts, version: int) -> tuple[int, int]:
    """The first path: the full state into the driver, then put back for the engines. (driver, object store) bytes."""
    state_ref = parts.trainer.actors[0].trainable_state.remote()
    state = ray.get(state_ref)
    ref = ray.put(state)
    ray.get(parts.rollout_group.broadcast("update_weights", ref, version))
    return 2 * len(pickle.dumps(state, protocol=5)), _object_bytes([state_ref, ref])


def object_store_sync(parts, version: int) -> tuple[int, int]:
    """``Parts.sync_weights`` with weight_sync=object_store: the driver holds a reference only."""
    parts.sync_weights(version)
    return len(pickle.dumps(parts.weights, protocol=5)), _object_bytes([parts.weights.ref])


def collective_sync(ws, version: int) -> tuple[int, int]:
    """``WeightSync.sync`` with weight_sync=collective: the driver holds a version number; nothing is put."""
    ws.sync(version)
    if ws.weights.ref is not None:
        raise RuntimeError("the collective sync fell back to the object store (see the warning above)")
    return len(pickle.dumps(ws.weights, protocol=5)), 0


def measure(size: str, model_path: str, steps: int, engines: int, extra: list[str]) -> dict:
    from actors.weight_sync import WeightSync
    from jobs import grpo as job
    from uniar_ray.config import GRPORunConfig, load_config

    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml",
                      OVERRIDES + [f"model.path={model_path}", f"steps={steps + 2}", f"rollout.num_actors={engines}",
                                   *extra])
    parts = job.Parts(cfg)
    try:
        rows = [job.grpo_step(cfg, parts, s, None)[0] for s in range(steps)][1:]
        out = {"size": size, "engines": engines, "step_time_s": statistics.median(r["step_time_s"] for r in rows),
               "sync_s": statistics.median(r["time/sync"] for r in rows)}
        out["sync_share"] = out["sync_s"] / out["step_time_s"]
        ws = WeightSync(parts.trainer, parts.rollout_group.actors,
                        dataclasses.replace(cfg.rollout, weight_sync="collective"), cfg.model.device)
        version = steps
        t0 = time.perf_counter()
        ws.sync(version)  # forms the group (rendezvous, gloo connections), then broadcasts
        out["collective_first_sync_s"] = time.perf_counter() - t0
        paths = (("driver", lambda v: driver_sync(parts, v)), ("object_store", lambda v: object_store_sync(parts, v)),
                 ("collective", lambda v: collective_sync(ws, v)))
        for name, fn in paths:
            times = []
            for _ in range(3):
                version += 1
                t0 = time.perf_counter()
                out[f"{name}_driver_bytes"], out[f"{name}_object_store_bytes"] = fn(version)
                times.append(time.perf_counter() - t0)
            out[f"{name}_sync_s"] = statistics.median(times)
        digests = ray.get([e.param_digest.remote() for e in parts.rollout_group.actors])
        out["engines_match_trainer"] = digests == [parts.trainer.param_digests()[0]] * engines
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
    ap.add_argument("--engines", type=int, default=1, help="rollout engines (each receives every sync)")
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides, e.g. grpo.beta=0.0 to save memory")
    a = ap.parse_args(argv)
    from jobs import init_local_ray  # a token of its own: never ~/.ray/auth_token

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            path = "tiny" if size == "tiny" else write_100m_checkpoint(f"{tmp}/ar_model")
            res = measure(size, path, a.steps, a.engines, a.extra)
            print(json.dumps(res), flush=True)
            results.append(res)
    ray.shutdown()
    print(json.dumps({"bench": "weight_sync", "steps": a.steps, "engines": a.engines, "extra": a.extra,
                      "results": results}))


if __name__ == "__main__":
    main()
