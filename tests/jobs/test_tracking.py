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


def test_grids_and_samples_go_to_both_trackers(tmp_path, monkeypatch):
    """TensorBoard gets the grid PNGs as images at their step; W&B the grid and a ``completions`` table of a dumped
    step's samples (TRL's log_completions layout: one row per sample, each reward, total, advantage)."""
    import json

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    grid = tmp_path / "grid.png"
    Image.fromarray(np.full((40, 60, 3), (200, 10, 10), np.uint8)).save(grid)
    t = Tracker(TrackingConfig(tensorboard=True, wandb=True, wandb_mode="offline"), tmp_path, {}, start_step=0)
    t.log({"step": 3, "reward_mean": 0.5})
    t.log_grid(3, grid)
    t.log_grid(4, None)  # nothing decoded at that step: nothing logged
    records = [{"prompt": "a red cube", "task": "geneval", "rewards": {"target_color": 0.25 + i, "ocr": None},
                "reward": 0.25 + i, "advantage": 1.0 - 2 * i, "excluded_reason": None} for i in range(2)]
    t.log_samples(3, records, [np.zeros((8, 8, 3), np.uint8), None])
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("grids")
    assert [(e.step, e.width, e.height) for e in images] == [(3, 60, 40)]
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    run_dir = next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    wandb_log(run_dir / f"run-{run_id}.wandb", b"completions")
    tables = list(run_dir.glob("files/media/table/completions_3_*.table.json"))
    assert len(tables) == 1, list(run_dir.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "task", "image", "ocr", "target_color", "reward", "advantage",
                                "excluded"]
    assert [row[5] for row in table["data"]] == [0.25, 1.25] and [row[7] for row in table["data"]] == [1.0, -1.0]
    assert list(run_dir.glob("files/media/images/grids_3_*.png"))
