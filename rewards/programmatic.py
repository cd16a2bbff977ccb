"""Programmatic rewards: closed-form scores of the pixels, no model. For demos, tests and benchmarks (a policy can
visibly learn "brighter" or "redder" in a few steps on CPU); not part of the reference's reward set.

    BrightnessReward(target=[0.8])           # 1 - |mean luminance - 0.8|
    TargetColorReward(target=[255, 0, 0])    # 1 - mean RGB distance to red / the largest possible distance
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from rewards.base import RewardBatch, RewardScores

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's convert("L")


class BrightnessReward:
    """Score = 1 - |mean luminance in [0, 1] - target|, in [0, 1]."""

    name = "brightness"
    tasks = None

    def __init__(self, target: Sequence[float] | None = None, delay_s: float = 0.0):
        level = float(target[0]) if target else 1.0
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"brightness target {level} outside [0, 1]")
        self.level, self.delay_s = level, delay_s

    def score(self, batch: RewardBatch) -> RewardScores:
        if self.delay_s:
            time.sleep(self.delay_s)
        luma = [(img.reshape(-1, 3).astype(np.float64) @ _LUMA).mean() / 255.0 for img in batch.images]
        return RewardScores(1.0 - np.abs(np.asarray(luma) - self.level), [None] * len(batch))


class TargetColorReward:
    """Score = 1 - mean Euclidean RGB distance to ``target`` / (255 * sqrt(3)), in [0, 1]."""

    name = "target_color"
    tasks = None

    def __init__(self, target: Sequence[float] | None = None, delay_s: float = 0.0):
        rgb = np.asarray(target if target else (255.0, 0.0, 0.0), dtype=np.float64)
        if rgb.shape != (3,) or rgb.min() < 0 or rgb.max() > 255:
            raise ValueError(f"target_color target must be [r, g, b] in 0..255, got {target}")
        self.rgb, self.delay_s = rgb, delay_s

    def score(self, batch: RewardBatch) -> RewardScores:
        if self.delay_s:
            time.sleep(self.delay_s)
        dist = [np.linalg.norm(img.reshape(-1, 3).astype(np.float64) - self.rgb, axis=1).mean() for img in batch.images]
        return RewardScores(1.0 - np.asarray(dist) / (255.0 * np.sqrt(3.0)), [None] * len(batch))
