"""GRPO step time on the tiny configuration: breakdown by stage, weight-sync share, synchronous vs ``one_step``.

    python -m perf.grpo [--steps 8] [--delay 0.0]
Both modes run in one local Ray session, one after the other, with the same config (configs/grpo_demo.yaml and
small overrides); the first step of each run (actor start, warm-up) is left out of the medians. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import ray

STAGES = ("rollout", "decode", "score", "advantages", "update", "sync")  # one_step adds wait_prefetch


def run(mode: str, steps: int, extra: list[str]) -> dict:
    from jobs import grpo as job

    with tempfile.TemporaryDirectory() as tmp:
        path = job.main(["--config", "configs/grpo_demo.yaml", f"steps={steps}", f"async_mode={mode}",
                         f"run_dir={tmp}/run", f"save_every={steps}", f"grid_every={steps}", "validation.every=0",
                         *extra])
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()][1:]
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    out = {"mode": mode, "step_time_s": round(med("step_time_s"), 3), "images_per_s": round(med("images_per_s"), 2)}
    out.update({f"{s}_s": round(med(f"time/{s}"), 3) for s in STAGES})
    if "time/wait_prefetch" in rows[0]:
        out["wait_prefetch_s"] = round(med("time/wait_prefetch"), 3)
    out["sync_share"] = round(out["sync_s"] / out["step_time_s"], 4)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--delay", type=float, default=0.0, help="simulated reward latency per call (s), e.g. a GPU judge")
    a = ap.parse_args(argv)
    extra = [f"rewards.models.target_color.delay_s={a.delay}"] if a.delay else []
    from jobs import init_local_ray  # a token of its own: never ~/.ray/auth_token

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sync = run("sync", a.steps, extra)
    print(json.dumps(sync), flush=True)
    overlap = run("one_step", a.steps, extra)
    print(json.dumps(overlap), flush=True)
    ray.shutdown()
    print(json.dumps({"bench": "grpo", "steps": a.steps, "reward_delay_s": a.delay, "sync": sync, "one_step": overlap,
                      "one_step_over_sync": round(overlap["step_time_s"] / sync["step_time_s"], 3)}))


if __name__ == "__main__":
    main()
