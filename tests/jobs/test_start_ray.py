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
