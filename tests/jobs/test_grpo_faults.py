"""The GRPO job when parts fail, on local Ray with tiny models: a restarted rollout engine samples the trainer's
current weights, a run whose decodes or rewards keep failing stops within its failure budget naming the cause
(no update, no checkpoint of such a step, non-zero exit). Stopping a running job: tests/faults/test_stop_signals.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from jobs import grpo as job
from uniar_ray.config import GRPORunConfig, load_config

FAST = ["save_every=1", "grid_every=1", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
        "validation.every=0"]
# Every decode times out (the actor is killed and, with no restarts left, stays dead): every group is excluded.
DECODE_FAILS = ["decoder.timeout_s=0.01", "decoder.max_retries=0", "decoder.max_restarts=0"]
# The redness reward (weight 1, every prompt) times out once, then its only actor is dead past its restarts.
REWARD_DIES = ["rewards.models.target_color.delay_s=2.0", "rewards.models.target_color.timeout_s=0.5",
               "rewards.max_restarts=0", "rewards.max_task_retries=0"]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_restarted_engine_samples_the_trainers_current_weights(ray_local):
    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", FAST + ["steps=3"])
    parts = job.Parts(cfg)
    try:
        m0, _ = job.grpo_step(cfg, parts, 0, None)
        assert {r.weight_version for r in parts.last_batch.rollouts} == {0} and m0["rollout/weight_version"] == 0
        assert parts.weights.version == 1 and parts.weights.ref is not None
        engine = parts.rollout_group.actors[0]
        ray.kill(engine, no_restart=False)  # Ray restarts it from model.path: version 0 until it pulls version 1
        m1, _ = job.grpo_step(cfg, parts, 1, None)
        assert {r.weight_version for r in parts.last_batch.rollouts} == {1} and m1["rollout/weight_version"] == 1
        # on-policy again: the restarted engine sampled with the trainer's weights, not the initial ones
        assert m1["train/sampling/sampling_logp_difference/max"] < 1e-4
        assert ray.get(engine.weights_version.remote()) == 2  # and took step 1's sync in place
    finally:
        parts.close()


def test_a_step_with_every_group_excluded_does_not_touch_the_model(ray_local, capsys):
    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", FAST + DECODE_FAILS + ["steps=2"])
    parts = job.Parts(cfg)
    try:
        before = parts.trainer.trainable_state()
        m, _ = job.grpo_step(cfg, parts, 0, None)
        after = parts.trainer.trainable_state()
    finally:
        parts.close()
    assert m["skipped_update"] == 1 and m["excluded_groups_all"] == m["groups"] == 2
    assert not any(k.startswith("train/") for k in m) and "time/sync" not in m
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step, no momentum drift
    out = capsys.readouterr().out
    assert "step 0: no prompt group could be scored" in out and "8x decode failed: timed out" in out


def test_decodes_that_always_fail_stop_the_run_with_the_cause(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "decode"
    with pytest.raises(SystemExit) as stop:
        job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run_dir}", *FAST, *DECODE_FAILS, "steps=6"])
    message = str(stop.value.code)  # a message as the exit code: the process exits with status 1
    assert message.startswith("[grpo] step 2: stopping: 6 of 6 prompt groups (100%) were excluded over the last 3")
    assert "grpo.max_excluded_fraction=0.5" in message and "decode failed" in message
    assert "No checkpoint was written" in message
    rows = _metrics(run_dir)
    assert [m["step"] for m in rows] == [0, 1, 2] and all(m["skipped_update"] == 1 for m in rows)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    out = capsys.readouterr().out
    assert out.count("no prompt group could be scored") == 3


def test_a_reward_dead_past_its_restarts_stops_the_run_naming_it(ray_local, tmp_path):
    run_dir = tmp_path / "reward"
    with pytest.raises(SystemExit) as stop:
        job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run_dir}", *FAST, *REWARD_DIES, "steps=6",
                  "grpo.failure_window=2"])
    message = str(stop.value.code)
    assert message.startswith("[grpo] step 1: stopping: 4 of 4 prompt groups (100%)")
    assert "target_color: timed out after" in message and "target_color: reward actor lost" in message
    assert [m["step"] for m in _metrics(run_dir)] == [0, 1]


def test_a_budget_of_one_never_stops_but_a_run_that_trained_nothing_exits_non_zero(ray_local, tmp_path):
    run_dir = tmp_path / "nothing"
    with pytest.raises(SystemExit, match=r"no step of this run updated the model"):
        job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run_dir}", *FAST, *DECODE_FAILS, "steps=2",
                  "grpo.max_excluded_fraction=1.0"])
    assert [m["step"] for m in _metrics(run_dir)] == [0, 1]
