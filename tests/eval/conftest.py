"""Eval-pipeline fixtures: one local Ray per test module, one tiny checkpoint per session, quick tiny configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from uniar_ray.config import EvalConfig, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_checkpoint")


@pytest.fixture
def quick_config(tiny_cache, tmp_path):
    """``quick_config("longtext", "benchmark.limit=2")``: the shipped quick tiny config (64x64 AR, 2 decoder
    steps) writing under this test's tmp_path."""

    def make(benchmark: str, *overrides: str) -> EvalConfig:
        return load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", [
            f"benchmark.name={benchmark}", f"tiny_cache={tiny_cache}", f"out_dir={tmp_path / benchmark}",
            "progress=false", "batch_size=4", *overrides])

    return make

