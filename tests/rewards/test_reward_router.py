"""Routing and NaN handling across a mixed batch, the weighted nansum, per-sample image checks, reward config."""
from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest

from rewards.base import (ImageLimits, ImageRejected, RewardBatch, RewardScores, check_image, encode_png,
                          run_reward, score_checked)
from rewards.programmatic import BrightnessReward, TargetColorReward
from rewards.router import RewardRouter, build_router, combine, reward_tasks
from uniar_ray.config import ConfigError, RewardConfig, RewardSpec, from_dict


class Fake:
    """Scores each sample with a fixed value per task; records what it was called with."""

    def __init__(self, name, tasks, value=0.5, fail_on=None, raises=False):
        self.name, self.tasks, self.value, self.fail_on, self.raises = name, tasks, value, fail_on, raises
        self.calls: list[list[str]] = []

    def score(self, batch):
        self.calls.append(list(batch.prompts))
        if self.raises:
            raise RuntimeError("server exploded")
        errors = ["bad sample" if p == self.fail_on else None for p in batch.prompts]
        return RewardScores(np.full(len(batch), self.value), errors)


def batch_of(tasks):
    n = len(tasks)
    return RewardBatch([np.zeros((4, 4, 3), np.uint8)] * n, [f"p{i}" for i in range(n)], list(tasks), [{}] * n)


def test_routing_by_task_and_weighted_nansum():
    geneval = Fake("geneval", frozenset({"geneval"}), 0.5)
    ocr = Fake("ocr", frozenset({"ocr"}), 0.25)
    hps = Fake("hps", None, 0.3)
    router = RewardRouter({"geneval": geneval, "ocr": ocr, "hps": hps}, {"geneval": 1.0, "ocr": 2.0, "hps": 0.5})
    out = router.score(batch_of(["geneval", "ocr", None, "general", "geneval"]))
    assert geneval.calls == [["p0", "p4"]] and ocr.calls == [["p1"]] and hps.calls == [["p0", "p1", "p2", "p3", "p4"]]
    assert np.isnan(out.per_reward["geneval"][[1, 2, 3]]).all() and np.isnan(out.per_reward["ocr"][[0, 2, 3, 4]]).all()
    np.testing.assert_allclose(out.total, [0.5 + 0.15, 0.5 + 0.15, 0.15, 0.15, 0.5 + 0.15])
    assert out.valid.all() and out.unscored == [] and out.failed == {}
    assert out.matrix().shape == (5, 3)
    assert out.metrics["reward/geneval/count"] == 2 and out.metrics["reward/geneval/not_applicable"] == 3
    assert out.metrics["reward/hps/mean"] == pytest.approx(0.3)


def test_reward_with_no_sample_is_not_called():
    geneval = Fake("geneval", frozenset({"geneval"}))
    out = run_reward(geneval, batch_of(["ocr", None]))
    assert geneval.calls == [] and out.called == 0 and np.isnan(out.scores).all() and out.failures == 0


def test_sample_without_applicable_reward_is_reported_not_zero():
    router = RewardRouter({"geneval": Fake("geneval", frozenset({"geneval"})), "ocr": Fake("ocr", frozenset({"ocr"}))})
    out = router.score(batch_of(["geneval", None, "ocr"]))
    assert out.unscored == [1] and not out.valid[1] and math.isnan(out.total[1])
    assert out.total[0] == 0.5 and out.metrics["reward/unscored"] == 1


def test_failures_are_nan_counted_and_exclude_the_sample():
    hps = Fake("hps", None, 0.3, fail_on="p1")
    judge = Fake("judge", None, 0.8, raises=True)
    ocr = Fake("ocr", frozenset({"ocr"}), 1.0)
    out = RewardRouter({"hps": hps, "judge": judge, "ocr": ocr}).score(batch_of(["ocr", None, None]))
    assert out.errors["hps"] == [None, "bad sample", None]
    assert all(e.startswith("RuntimeError: server exploded") for e in out.errors["judge"])
    assert np.isnan(out.per_reward["judge"]).all() and math.isnan(out.per_reward["hps"][1])
    assert not out.valid.any() and np.isnan(out.total).all()  # every sample lost its judge score
    assert set(out.failed) == {0, 1, 2} and any("hps: bad sample" in r for r in out.failed[1])
    assert out.metrics["reward/judge/failures"] == 3 and out.metrics["reward/hps/failures"] == 1


def test_zero_weight_reward_only_logs():
    out = RewardRouter({"a": Fake("a", None, 0.4), "b": Fake("b", None, raises=True)}, {"a": 1.0, "b": 0.0}).score(
        batch_of([None, None]))
    assert out.valid.all() and np.allclose(out.total, 0.4) and out.metrics["reward/b/failures"] == 2


def test_wrong_length_result_fails_the_call():
    class Short:
        name, tasks = "short", None

        def score(self, batch):
            return RewardScores(np.zeros(1), [None])

    out = run_reward(Short(), batch_of([None, None]))
    assert out.failures == 2 and "returned 1 results for 2" in out.errors[0]


def test_combine_rejects_missing_outputs_and_router_checks_weights():
    with pytest.raises(ValueError):
        combine({}, {"x": 1.0})
    with pytest.raises(ValueError):
        RewardRouter({"a": Fake("a", None)}, {"b": 1.0})
    with pytest.raises(ValueError):
        RewardRouter({})


def test_programmatic_rewards():
    white, black = np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    b = RewardBatch([white, black, red], ["", "", ""], [None] * 3, [{}] * 3)
    np.testing.assert_allclose(BrightnessReward([1.0]).score(b).scores, [1.0, 0.0, 0.299])
    np.testing.assert_allclose(TargetColorReward([255, 0, 0]).score(b).scores,
                               [1 - math.sqrt(2) / math.sqrt(3), 1 - 1 / math.sqrt(3), 1.0])
    with pytest.raises(ValueError):
        BrightnessReward([1.5])
    with pytest.raises(ValueError):
        TargetColorReward([1, 2])


# --- config -------------------------------------------------------------------------------------------------------

def test_reward_config_kinds_tasks_and_build():
    cfg = from_dict(RewardConfig, {"models": {"brightness": {"weight": 2, "target": [0.5]},
                                              "red": {"kind": "target_color", "tasks": ["general"]},
                                              "ocr": {}}})
    assert cfg.models["brightness"].kind == "brightness" and cfg.weights == {"brightness": 2.0, "red": 1.0, "ocr": 1.0}
    assert reward_tasks(cfg.models["red"]) == frozenset({"general"})
    assert reward_tasks(cfg.models["ocr"]) == frozenset({"ocr"})
    assert reward_tasks(RewardSpec(kind="geneval")) == frozenset({"geneval"})
    assert reward_tasks(RewardSpec(kind="hps")) is None
    router = build_router(cfg)
    out = router.score(batch_of(["general", None]))
    assert out.per_reward["red"][0] == pytest.approx(1 - 255 / (255 * math.sqrt(3)))
    assert math.isnan(out.per_reward["red"][1]) and np.isnan(out.per_reward["ocr"]).all()
    with pytest.raises(ConfigError, match="set kind"):
        from_dict(RewardConfig, {"models": {"mine": {}}})
    with pytest.raises(ConfigError, match="reward.kind"):
        from_dict(RewardConfig, {"models": {"x": {"kind": "clip"}}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RewardConfig, {"models": {"ocr": {"wieght": 1}}})


# --- images -------------------------------------------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with almost no data: what a decompression bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND",
                                                                                                              b"")


def test_image_checks():
    img = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert (check_image(img) == img).all()
    assert (check_image(encode_png(img)) == img).all()
    assert check_image(img[:, :, 0]).shape == (4, 4, 3)  # grey -> RGB
    for bad, why in [(img.astype(np.float32), "dtype"), (np.zeros((4, 4, 4), np.uint8), "shape"),
                     (b"not an image", "corrupt"), (encode_png(img)[:40], "corrupt"), ("a string", "expected"),
                     (_png_header_only(5000, 5000), "pixels"),
                     (_png_header_only(100_000, 100_000), "DecompressionBomb|pixels")]:
        with pytest.raises(ImageRejected, match=why):
            check_image(bad)
    with pytest.raises(ImageRejected, match="exceeds"):
        check_image(np.zeros((64, 64, 3), np.uint8), ImageLimits(max_pixels=1000))
    with pytest.raises(ImageRejected, match="bytes exceeds"):
        check_image(encode_png(img), ImageLimits(max_bytes=10))
    gif = io.BytesIO()
    from PIL import Image

    Image.fromarray(img).save(gif, format="GIF")
    with pytest.raises(ImageRejected, match="format GIF"):
        check_image(gif.getvalue())


def test_score_checked_rejects_per_sample():
    fake = Fake("b", None, 0.7)
    good = encode_png(np.zeros((4, 4, 3), np.uint8))
    out = score_checked(fake, [good, b"junk", np.zeros((4, 4, 3), np.uint8)], ["a", "b", "c"], [None] * 3, [{}] * 3)
    assert fake.calls == [["a", "c"]]
    assert out.scores[0] == 0.7 and math.isnan(out.scores[1]) and out.scores[2] == 0.7
    assert out.errors[1].startswith("image rejected: corrupt image")
    out = score_checked(fake, [b"junk"], ["x"], [None], [{}])
    assert len(fake.calls) == 1 and math.isnan(out.scores[0])  # nothing left: the reward is not called
