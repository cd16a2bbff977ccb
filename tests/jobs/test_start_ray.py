"""jobs.start_ray: an embedded local Ray (address="local") unless cluster.address asks for a cluster; RAY_ADDRESS in
the environment is never joined by accident, and the job says which Ray it uses."""
from __future__ import annotations

import types

import pytest
import ray

from jobs import start_ray
from uniar_ray.config import ClusterConfig


@pytest.fixture()
def fake_init(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="10.0.0.9:6379"))
    return calls


def test_local_ray_even_with_ray_address_set(fake_init, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert start_ray(types.SimpleNamespace(cluster=ClusterConfig(num_cpus=2)))
    assert fake_init[0]["address"] == "local" and fake_init[0]["num_cpus"] == 2
    err = capsys.readouterr().err
    assert "embedded local Ray" in err and "RAY_ADDRESS=10.0.0.1:6379 ignored" in err


def test_cluster_address_is_joined(fake_init, capsys):
    assert start_ray(types.SimpleNamespace(cluster=ClusterConfig(address="auto")))
    assert fake_init == [{"address": "auto"}]
    assert "joined the cluster at auto (GCS 10.0.0.9:6379)" in capsys.readouterr().err


def test_local_ray_gets_its_own_token_not_a_file_in_home(fake_init, monkeypatch, tmp_path):
    """No token configured: the embedded Ray authenticates with a token in the environment, so Ray never writes
    ~/.ray/auth_token (which would turn token auth on for every Ray the user starts later)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    start_ray(types.SimpleNamespace(cluster=ClusterConfig()))
    import os

    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64 and not (tmp_path / ".ray").exists()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-users-own")
    start_ray(types.SimpleNamespace(cluster=ClusterConfig()))
    assert os.environ["RAY_AUTH_TOKEN"] == "the-users-own"  # a configured token is left alone
