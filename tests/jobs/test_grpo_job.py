"""The GRPO job end to end on local Ray with tiny models: resume equals the uninterrupted run, a reward actor
killed mid-step does not crash the step, and metrics/plots/checkpoints are written."""
from __future__ import annotations

import json
import threading

import pytest
import ray
import torch

from jobs import grpo as job
from uniar_ray import gallery

FAST = ["steps=3", "save_every=1", "grid_every=1", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
        "validation.every=0"]  # validation: tested where named (the demo validates every 5 steps)


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _model_state(run_dir, step):
    f = run_dir / "checkpoints" / f"step-{step:06d}" / "trainer" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


def test_resume_gives_the_same_next_step(ray_local, tmp_path):
    # The "interrupted" run is a 2-step run, so the learning rate must not depend on the run's length (the demo's
    # linear decay to 0 at the last step would give it another schedule than the 3-step run it is compared with).
    fast = FAST + ["grpo.lr_scheduler_type=constant",  # and validation: the resume reuses what it has
                   "validation.every=2", "validation.holdout=4", "validation.num_generations=2"]
    full = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'full'}", *fast])
    part = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'part'}", *fast[1:], "steps=2"])
    resumed = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={part}", *fast, "--resume"])
    assert resumed == part
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in a] == [0, 1, 2, 3] and [m["step"] for m in b] == [0, 1, 2, 3]  # 3: the final policy
    for key in ("reward_mean", "train/loss", "train/kl", "train/grad_norm"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-4, abs=1e-6), key
    # validations at 0, 2 and the end: the 2-step run's last one (step 2) is reused by the resume, not redone
    assert [json.loads(x)["step"] for x in (part / "validation.jsonl").read_text().splitlines()] == [0, 2, 3]
    for step in (0, 2, 3):
        assert a[step]["val/reward_mean"] == pytest.approx(b[step]["val/reward_mean"], rel=1e-4), step
    assert set(a[3]) == {"step", "val/target_color/mean", "val/reward_mean", "val/num_samples", "val/num_failed",
                         "val/time_s"}
    sa, sb = _model_state(full, 3), _model_state(part, 3)
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) < 1e-5
    assert (full / "reward_curve.png").stat().st_size > 0 and list((full / "grids").glob("*.png"))
    # the demo's rollouts.dump_every: the first and the last step of each run; the resumed run links on from step 1
    assert gallery.dumped_steps(full / "rollouts") == [0, 2] and gallery.dumped_steps(part / "rollouts") == [0, 1, 2]
    assert 'href="../step-000002/index.html"' in (part / "rollouts" / "step-000001" / "index.html").read_text()
    first = a[0]
    # on-policy first step: the loss value is -mean(A) = 0 up to the IS weights (1 +- 1e-6)
    assert abs(first["train/loss"]) < 1e-4 and "train/clip_ratio/region_mean" in first
    for key in ("time/rollout", "time/decode", "time/score", "time/update", "time/sync", "step_time_s",
                "images_per_s", "frac_reward_zero_std", "train/entropy", "train/grad_norm",
                "train/sampling/importance_sampling_capped_frac", "train/sampling/importance_sampling_ratio/min"):
        assert key in first, key


@pytest.mark.parametrize("retries", [1, 0])
def test_reward_actor_killed_mid_step(ray_local, retries):
    """retries=1: Ray restarts the actor and re-runs the call, every sample is scored. retries=0: the samples of that
    call fail, their groups are excluded and counted; the step completes (never a made-up 0) and, every group being
    excluded, does not update the model."""
    from uniar_ray.config import GRPORunConfig, load_config

    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", FAST + [
        "rewards.models.target_color.delay_s=3.0",
        f"rewards.max_task_retries={retries}"])
    parts = job.Parts(cfg)
    try:
        victim = parts.rewards.pools["target_color"][0]
        ray.get(victim.ready.remote())
        timers = []
        score = parts.rewards.score

        def score_and_kill(*args, **kwargs):  # the kill lands inside the 3 s call, however long the stages before
            timers.append(threading.Timer(1.0, lambda: ray.kill(victim, no_restart=False)))
            timers[-1].start()
            return score(*args, **kwargs)

        parts.rewards.score = score_and_kill
        m, _ = job.grpo_step(cfg, parts, 1, None)
        assert len(timers) == 1
        timers[0].join()
        rollouts = parts.last_batch.rollouts
        if retries:
            assert m["score/reward/target_color/count"] == 8 and m["score/reward/target_color/failures"] == 0
            assert m["excluded_groups"] == 0
            assert m["train/loss"] == m["train/loss"]  # finite: the step completed
        else:
            assert m["score/reward/target_color/failures"] == 8 and m["excluded_groups"] == 2
            assert all(r.excluded and r.advantage == 0.0 for r in rollouts)
            assert "target_color" in rollouts[0].excluded
            assert m["skipped_update"] == 1 and "train/loss" not in m  # the step completed without an update
    finally:
        parts.close()


def test_one_step_async_mode_runs_and_corrects_for_staleness(ray_local, tmp_path):
    path = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'async'}", *FAST,
                     "async_mode=one_step"])
    rows = _metrics(path)
    assert [m["step"] for m in rows] == [0, 1, 2]
    assert all("time/wait_prefetch" in m and m["train/loss"] is not None for m in rows)
    # step 2's samples came from the weights before step 1's update: the IS ratio is no longer exactly 1
    assert rows[2]["train/sampling/sampling_logp_difference/max"] > 1e-4


@pytest.mark.parametrize("mode", ["sync", "one_step"])
def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(ray_local, tmp_path, mode):
    # An absurd learning rate blows the weights up after step 0; step 1's loss is then not finite (in one_step mode
    # while step 2's roll-out is in flight: the job must not wait on it forever)
    with pytest.raises(SystemExit, match=r"step 1: the loss is nan.*last good checkpoint"):
        job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'nan'}", *FAST,
                  "grpo.learning_rate=1e30", "grpo.max_grad_norm=0.0", f"async_mode={mode}"])
    saved = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert saved == ["step-000001"]  # written after the good step 0; nothing after the bad step
    assert [m["step"] for m in _metrics(tmp_path / "nan")] == [0]
