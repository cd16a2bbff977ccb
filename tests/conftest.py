"""Shared fixtures: tiny seeded UniAR models and a folder holding the registered public data files (never copied
into the repo: the mirror, or the user cache filled from the sources; see uniar_ray/datasets.py)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI and the project's machines keep a data mirror beside the checkout; a user's clone sets UNIAR_DATA_MIRROR or
# lets the registry download the files into the cache.
_SIBLING_MIRROR = REPO.parent / "shared" / "data"
if _SIBLING_MIRROR.is_dir():
    os.environ.setdefault("UNIAR_DATA_MIRROR", str(_SIBLING_MIRROR))
# Ray 2.60 turns token auth on for every new local Ray and, when it finds no token, writes ~/.ray/auth_token, after
# which every Ray on the machine requires it. The suite's Rays (and the jobs its tests start) share one token from
# the environment instead, so nothing is written to the user's home. Cluster tests give their nodes their own.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """A root with every registered data file at its registry name, verified by sha256."""
    from uniar_ray import datasets

    return datasets.fetch_many(datasets.registry())


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


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """An embedded Ray for one test module (2 CPUs, its own temp dir, the suite's token): a module that leaves
    actors behind cannot starve the next one of CPUs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()

