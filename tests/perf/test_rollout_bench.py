"""perf/rollout.py's torch engines at N = 64: each configuration the CPU side-by-side run measures builds and runs."""
from __future__ import annotations

import pytest
import torch

from perf import rollout


@pytest.mark.parametrize("kind", sorted(rollout.ENGINES))
def test_rollout_bench_engine_runs(kind):
    threads = torch.get_num_threads()
    try:
        row = rollout._measure(kind, 64, 2, "fp32", 1)  # sets the thread count, as in its own process
    finally:
        torch.set_num_threads(threads)
    assert row["engine"] == kind and row["n"] == 64 and row["batch"] == 2
    assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0


def test_the_reference_runs_the_reference_s_layers_and_sampler():
    assert rollout.ENGINES["reference"] == {"recompute_visual_stack": True, "fuse": False, "multinomial_sampler": True}
    assert rollout.ENGINES["reference_our_kernels"]["multinomial_sampler"]
