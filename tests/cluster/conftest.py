"""The namespace cluster shared by the cluster tests: made once per session, removed at the end even when a test
fails (fixture finaliser, atexit, and ``up`` removing leftovers of an earlier run by name prefix).

Where namespaces cannot be made the tests are skipped with the reason, except under CI (``CI=true`` or
``UNIAR_REQUIRE_CLUSTER=1``, which ``.ci/run`` sets): there a skipped cluster test would hide untested code, so it
fails.
"""
from __future__ import annotations

import atexit
import fcntl
import os
from pathlib import Path

import pytest

from tests.cluster.netns import Cluster, open_lock_file, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
# Its own prefix and subnet, apart from the by-hand default ("uniar", 10.213.7): a session never removes a cluster
# that a person brought up by hand.
PREFIX, SUBNET = "uniart", "10.213.8"


def cluster_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("UNIAR_REQUIRE_CLUSTER") == "1"


@pytest.fixture(scope="session")
def cluster_lock():
    """One namespace cluster per machine at a time: a second test session waits here instead of tearing it down."""
    reason = unavailable_reason()
    if reason:
        if cluster_required():
            pytest.fail(f"cluster tests cannot run under CI: {reason}", pytrace=False)
        pytest.skip(reason)
    fd = open_lock_file(Path(f"/tmp/{PREFIX}.lock"))  # root, in the shared /tmp: no link followed, nothing written
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def cluster(cluster_lock):
    """A head (CPU: 0) and two workers (2 CPUs each), each in its own namespace with its own address."""
    c = Cluster(prefix=PREFIX, subnet=SUBNET)
    atexit.register(c.down)  # also when the session dies before the finaliser runs
    try:
        c.formed_in = c.up()
        yield c
    finally:
        c.down()
        atexit.unregister(c.down)


def bring_back_workers(c: Cluster) -> Cluster:
    """Start every worker that is down (a test that killed a node leaves it to the next one to bring back)."""
    missing = [w for w in c.workers if not c.pids(w)]
    for w in missing:
        c.start_worker(w)
    if missing:
        c.wait_nodes(len(c.nodes))
    return c


@pytest.fixture()
def healthy(cluster):
    """The cluster with every node running."""
    return bring_back_workers(cluster)
