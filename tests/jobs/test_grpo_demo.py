"""The demo visibly learns: with its fixed seeds the mean reward of the last 3 steps exceeds the first 3 by >= 0.1
(0-1 scale) and by >= 10x the per-step noise; and the noise estimate itself."""
from __future__ import annotations

import json
import os
import random
import uuid

import numpy as np
import pytest
import ray
from PIL import Image

from jobs import grpo as job


def test_step_noise_ignores_the_trend():
    rng = random.Random(0)
    curve = [0.01 * i + rng.gauss(0.0, 0.02) for i in range(3000)]
    assert job.step_noise(curve) == pytest.approx(0.02, rel=0.05)
    assert job.step_noise([0.1 * i for i in range(10)]) == pytest.approx(0.0, abs=1e-12)  # a pure trend: no noise


@pytest.mark.slow
def test_demo_reward_rises_and_the_grids_turn_red(tmp_path_factory):
    os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)  # never a token file in ~/.ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))  # short: Ray's socket paths must fit 107 bytes
    try:
        path = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path_factory.mktemp('demo')}",
                         "steps=12", "save_every=12", "grid_every=12"])
    finally:
        ray.shutdown()
    rewards = [json.loads(line)["reward_mean"] for line in (path / "metrics.jsonl").read_text().splitlines()]
    rise = np.mean(rewards[-3:]) - np.mean(rewards[:3])
    assert rise >= 0.1 and rise >= 10 * job.step_noise(rewards), rewards

    def red_share(step):  # pixels that are clearly red in the step's grid
        px = np.asarray(Image.open(path / "grids" / f"step-{step:06d}.png").convert("RGB"), dtype=np.int32)
        return ((px[..., 0] > 150) & (px[..., 1] < 100) & (px[..., 2] < 100)).mean()

    assert red_share(11) > red_share(0) + 0.1
