"""The GRPO job with rollout.placement=colocated on local Ray (tiny models): the trainer ranks roll out, no engine
actors exist, every synchronous step is on-policy (the ranks sampled their current weights), and one_step mode
samples the weights from before the previous update, as with separate engines."""
from __future__ import annotations

import json

import pytest

from jobs import grpo as job
from uniar_ray.config import GRPORunConfig, load_config

FAST = ["save_every=1", "grid_every=3", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
        "rollout.placement=colocated"]

pytestmark = pytest.mark.slow


def test_synchronous_steps_are_on_policy_without_engine_actors(ray_local):
    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", FAST + ["steps=2", "trainer.world_size=2"])
    parts = job.Parts(cfg)
    try:
        assert parts.rollout_group is None
        for step in (0, 1):
            m, _ = job.grpo_step(cfg, parts, step, None)
            assert {r.weight_version for r in parts.last_batch.rollouts} == {step}
            assert not m["skipped_update"] and parts.weights.version == step + 1 and parts.weights.ref is None
            # the ranks' roll-out log-probs are the trainer's own for the weights it then trains
            assert m["train/sampling/sampling_logp_difference/max"] < 1e-4
    finally:
        parts.close()


def test_one_step_mode_samples_one_update_behind(ray_local, tmp_path):
    path = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'run'}", *FAST, "steps=3",
                     "async_mode=one_step"])
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in lines if "reward_mean" in m]  # training steps; the final validation has a row of its own
    assert [m["step"] for m in rows] == [0, 1, 2]
    assert "val/reward_mean" in rows[0] and lines[-1]["step"] == 3  # validation samples on the ranks too
    # step k+1 is submitted to the ranks before step k's update, and they run calls in order
    assert [m["rollout/weight_version"] for m in rows] == [0, 0, 1]
    assert rows[2]["train/sampling/sampling_logp_difference/max"] > 1e-4  # stale by one update, as designed
    assert (path / "checkpoints" / "step-000001" / "prefetched_rollouts.npz").exists()  # taken from the ranks
