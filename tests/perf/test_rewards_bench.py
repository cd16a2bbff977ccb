"""perf/rewards.py --self-judge at toy size: both paths score the same roll-outs, the figures and the agreement are
reported (the side-by-side run in perf/RESULTS.md uses the same code)."""
from __future__ import annotations

import math

import torch

from perf import rewards


def test_self_judge_vs_decode_runs():
    threads = torch.get_num_threads()
    try:
        out = rewards.main(["--self-judge", "--batch", "3", "--size", "64", "--repeats", "1", "--decode-steps", "1"])
    finally:
        torch.set_num_threads(threads)
    assert out["batch"] == 3 and out["ar_size"] == 64
    assert all(out["wall_s"][k] > 0 and out["cpu_s"][k] > 0 for k in ("bits", "decode", "pixels"))
    assert out["self_judge_images_per_s"] > 0 and out["decode_plus_judge_images_per_s"] > 0
    assert -1.0 <= out["spearman_bits_vs_pixels"] <= 1.0 and not math.isnan(out["spearman_bits_vs_pixels"])
    assert rewards.spearman([1, 2, 3], [10, 30, 20]) == 0.5
