"""The three-node namespace cluster (tests/cluster/netns.py): time to form it, and the GRPO step time there (two
trainer ranks on two worker nodes) vs the same config on one node (embedded local Ray). Needs root.

    sudo .venv/bin/python -m perf.cluster [--steps 5]
The first step of each run (actor start, DeepSpeed init) is left out of the medians. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster.netns import Cluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "uniar" / "rl_demo" / "demo_mix.yaml"
CONFIG = ["--config", "configs/grpo_demo.yaml", "data.prompts_per_step=2", "grpo.num_generations=4",
          "trainer.micro_batch_size=2", "trainer.world_size=2", "grpo.decode_num_inference_steps=2",
          f"data.path={DATA}", "validation.every=0"]


def medians(run_dir: Path, wall_s: float) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    med = lambda key: round(statistics.median(r[key] for r in rows), 3)  # noqa: E731
    return {"step_time_s": med("step_time_s"), "rollout_s": med("time/rollout"), "decode_s": med("time/decode"),
            "update_s": med("time/update"), "sync_s": med("time/sync"), "job_wall_s": round(wall_s, 1)}


def on_cluster(c: Cluster, steps: int, run_dir: Path) -> dict:
    t0 = time.perf_counter()
    proc = c.submit([sys.executable, "-m", "jobs.grpo", *CONFIG, f"steps={steps}", f"save_every={steps}",
                     "trainer.placement_strategy=STRICT_SPREAD", "cluster.address=auto", f"run_dir={run_dir}"], REPO)
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the cluster run failed:\n{out[-3000:]}")
    return medians(run_dir, time.perf_counter() - t0)


def on_one_node(steps: int, run_dir: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.grpo", *CONFIG, f"steps={steps}", f"save_every={steps}",
                    "cluster.num_cpus=4", f"run_dir={run_dir}"], cwd=REPO, env=env, check=True, timeout=1800,
                   capture_output=True)
    return medians(run_dir, time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    c = Cluster(prefix="uniarp", subnet="10.213.9")
    result = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result["form_cluster"] = {k: round(v, 1) for k, v in c.up().items()}
            result["cluster_3_nodes"] = on_cluster(c, a.steps, Path(tmp) / "cluster")
        finally:
            t0 = time.perf_counter()
            c.down()
            result["down_s"] = round(time.perf_counter() - t0, 1)
        result["one_node"] = on_one_node(a.steps, Path(tmp) / "local", Path(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
