"""Real monitoring parts: headless Chromium (Debian's ``chromium``) and Prometheus (Debian's ``prometheus``). Where a
binary is missing the tests that need it are skipped with the reason, except under CI (``CI=true`` or
``UNIAR_REQUIRE_CLUSTER=1``, which ``.ci/run`` sets, and which installs both): there they fail."""
from __future__ import annotations

import shutil

import pytest

from tests.cluster.conftest import cluster_required


def require(binary: str, package: str) -> str:
    """The binary's path, or a skip (a failure under CI) that says how to install it."""
    path = shutil.which(binary)
    if path:
        return path
    reason = f"{binary} is not installed (apt-get install -y {package}; .ci/run installs it)"
    if cluster_required():
        pytest.fail(f"under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session's page checks."""
    from monitoring.chromium import Browser

    require("chromium", "chromium")
    with Browser() as b:
        yield b
