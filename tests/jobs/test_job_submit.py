"""``ray job submit`` of a short GRPO run against a local ``ray start --head`` cluster with token authentication."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
DASHBOARD = "http://127.0.0.1:8265"


@pytest.fixture()
def token_cluster(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    start = subprocess.run([RAY, "start", "--head", "--num-cpus=2", "--include-dashboard=true",
                            "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_runs_a_grpo_step_with_token_auth(token_cluster, tmp_path, shared_data):
    with pytest.raises(urllib.error.HTTPError) as e:  # the dashboard's job API refuses callers without the token
        urllib.request.urlopen(f"{DASHBOARD}/api/jobs/", timeout=30)
    assert e.value.code == 401
    run_dir = tmp_path / "run"
    cmd = [RAY, "job", "submit", "--address", DASHBOARD, "--working-dir", str(REPO), "--",
           sys.executable, "-m", "jobs.grpo", "--config", "configs/grpo_demo.yaml", "cluster.address=auto",
           "steps=1", "data.prompts_per_step=2", "grpo.num_generations=4", "trainer.micro_batch_size=4",
           "grpo.decode_num_inference_steps=2", f"run_dir={run_dir}",
           # the working dir is uploaded to the cluster; the data (mirror or cache) is not, so name it absolutely
           f"data.path={shared_data / 'uniar' / 'rl_demo' / 'demo_mix.yaml'}"]
    out = subprocess.run(cmd, env=token_cluster, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "[grpo] step    0" in out.stdout and "succeeded" in out.stdout
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1
