"""Experiment trackers (uniar_ray/tracking.py) without Ray: TensorBoard gets the keys of metrics.jsonl at their
step, a resumed run drops the events of the steps it runs again, W&B offline works without a network."""
from __future__ import annotations

import pytest

from uniar_ray.config import TrackingConfig
from uniar_ray.tracking import Tracker


def wandb_log(path, needle: bytes, timeout_s: float = 60.0) -> bytes:
    """The offline transaction log once it holds ``needle``: wandb's core process may still be writing it when
    finish() returns (it completes on its own, before `wandb sync` could read it)."""
    import time

    deadline = time.monotonic() + timeout_s
    while needle not in (data := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert needle in data, f"{path}: no {needle!r} after {timeout_s:.0f} s"
    return data


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_tensorboard_resume_replaces_the_steps_run_again(tmp_path):
    cfg = TrackingConfig(tensorboard=True)
    first = Tracker(cfg, tmp_path, {}, start_step=0)
    for step in range(4):
        first.log({"step": step, "reward_mean": 0.1 * step, "train/loss": 1.0, "note": "text", "nan": float("nan")})
    first.close()  # killed after step 3; the checkpoint was at step 2
    again = Tracker(cfg, tmp_path, {}, start_step=2)
    for step in (2, 3):
        again.log({"step": step, "reward_mean": 0.5 + step, "train/loss": 2.0})
    again.close()
    assert _scalars(tmp_path / "tensorboard", "reward_mean") == [(0, 0.0), (1, 0.1), (2, 2.5), (3, 3.5)]
    assert _scalars(tmp_path / "tensorboard", "train/loss") == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]


def test_wandb_offline_keeps_one_run_id_per_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: any network use would fail
    cfg = TrackingConfig(wandb=True, wandb_mode="offline")
    t = Tracker(cfg, tmp_path, {"steps": 2}, start_step=0)
    t.log({"step": 0, "reward_mean": 0.25})
    t.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    log = wandb_log(next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")), b"reward_mean")
    assert b"0.25" in log
    Tracker(cfg, tmp_path, {}, start_step=1).close()  # a resume continues the same W&B run
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id


def test_trackers_are_off_by_default(tmp_path):
    t = Tracker(TrackingConfig(), tmp_path, {}, start_step=0)
    t.log({"step": 0, "reward_mean": 1.0})
    t.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_mode_is_checked():
    from uniar_ray.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.wandb_mode='cloud'"):
        TrackingConfig(wandb_mode="cloud")
