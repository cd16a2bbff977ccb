"""Reward actors on local Ray: same scores as in-process, per-sample image rejection, a call that times out, and an
actor killed mid-call (NaN and counted without retries; retried on the restarted actor with them)."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import ray

from actors.reward_models import RewardGroup
from rewards.router import build_router
from uniar_ray.config import RewardConfig, from_dict


def _cfg(models, **top) -> RewardConfig:
    return from_dict(RewardConfig, {"models": models, **top})


def test_group_matches_in_process_router(ray_local, render_text):
    cfg = _cfg({"ocr": {"num_cpus": 0.5}, "brightness": {"target": [0.9], "num_cpus": 0.25, "weight": 0.5},
                "red": {"kind": "target_color", "tasks": ["general"], "num_cpus": 0.25, "num_actors": 2}})
    images = [render_text("Hello World"), np.zeros((32, 32, 3), np.uint8), np.full((16, 16, 3), 200, np.uint8),
              render_text("Goodbye")]
    prompts = ['"Hello World"', "dark", "light", '"Hello World"']
    tasks = ["ocr", None, "general", "ocr"]
    metadata = [{}, None, {"k": 1}, {}]
    group = RewardGroup(cfg)
    try:
        par = group.score(images, prompts, tasks, metadata)
        seq = group.score(images, prompts, tasks, metadata, parallel=False)
        group.cfg.wire_format = "png"  # the same images as PNG bytes, plus one corrupt sample
        png = group.score(images + [b"\x89PNG broken"], prompts + ["x"], tasks + ["general"], metadata + [{}])
        before = group.stats()
        none = group.score(images[1:2], prompts[1:2], [None], [None])  # no ocr or general sample
        after = group.stats()
    finally:
        group.shutdown()
    from rewards.base import RewardBatch

    local = build_router(cfg).score(RewardBatch(images, prompts, tasks, [m or {} for m in metadata]))
    for out in (par, seq):
        for name in ("ocr", "brightness", "red"):
            np.testing.assert_allclose(out.per_reward[name], local.per_reward[name], rtol=1e-12)
        np.testing.assert_allclose(out.total, local.total)
    assert par.per_reward["ocr"][0] >= 0.8 and par.per_reward["ocr"][3] <= 0.3
    np.testing.assert_allclose(png.total[:4], par.total)
    assert not png.valid[4] and all("image rejected" in r for r in png.failed[4])
    assert group.failures["red"] == 1 and group.failures["ocr"] == 0
    assert after["ocr"] == before["ocr"] and after["red"] == before["red"]  # not called at all
    assert sum(s["calls"] for s in after["brightness"]) == sum(s["calls"] for s in before["brightness"]) + 1
    assert sum(s["rejected_images"] for s in after["red"]) == 1 and sum(s["calls"] for s in after["red"]) == 4
    assert np.isnan(none.per_reward["ocr"]).all() and none.valid.all()


def test_timeout_fails_only_that_reward(ray_local):
    cfg = _cfg({"slow": {"kind": "brightness", "delay_s": 3.0, "timeout_s": 1.0, "num_cpus": 0.25},
                "fast": {"kind": "brightness", "num_cpus": 0.25}})
    group = RewardGroup(cfg)
    try:
        group.wait_ready(60)
        t0 = time.monotonic()
        out = group.score([np.zeros((8, 8, 3), np.uint8)] * 2, ["a", "b"], [None, None], [{}, {}])
        assert time.monotonic() - t0 < 2.9  # did not wait for the slow call
    finally:
        group.shutdown()
    assert all(e == "timed out after 1s" for e in out.errors["slow"]) and np.isnan(out.per_reward["slow"]).all()
    np.testing.assert_allclose(out.per_reward["fast"], 0.0)
    assert not out.valid.any() and group.failures["slow"] == 2


@pytest.mark.parametrize("retries", [0, 1])
def test_actor_killed_mid_call(ray_local, retries):
    cfg = _cfg({"slow": {"kind": "brightness", "delay_s": 1.5, "num_cpus": 0.25}}, max_restarts=1,
               max_task_retries=retries)
    group = RewardGroup(cfg)
    images = [np.full((8, 8, 3), 255, np.uint8)] * 3
    try:
        group.wait_ready(60)
        actor = group.pools["slow"][0]
        killer = threading.Timer(0.5, lambda: ray.kill(actor, no_restart=False))
        killer.start()
        out = group.score(images, ["a", "b", "c"], [None] * 3, [{}] * 3)
        killer.join()
        if retries == 0:
            assert np.isnan(out.per_reward["slow"]).all() and not out.valid.any()
            assert all(e.startswith("reward actor lost") for e in out.errors["slow"])
            assert group.failures["slow"] == 3 and out.metrics["reward/slow/failures"] == 3
        else:  # Ray re-ran the call on the restarted actor
            np.testing.assert_allclose(out.total, 1.0)
            assert group.failures["slow"] == 0
        group.wait_ready(60)  # without retries, calls made while Ray restarts the actor would fail too
        again = group.score(images, ["a", "b", "c"], [None] * 3, [{}] * 3)  # the restarted actor
        np.testing.assert_allclose(again.total, 1.0)
        assert not math.isnan(again.metrics["reward/total/mean"])
    finally:
        group.shutdown()
