"""Shared fixtures: tiny seeded UniAR models and the path to ../shared/data (never copied into the repo)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"tests read the public prompt files from {SHARED_DATA} (see README)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_policy():
    from uniar_ray.model import build_tiny_policy

    torch.manual_seed(0)
    return build_tiny_policy(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_policy) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "ar_model"
    tiny_policy.save_pretrained(folder)
    return folder.parent
