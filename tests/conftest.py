"""Shared fixtures: one real redis-server per test session, one fresh run per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from storage import EmbeddedRedis, TrajectoryStore, connect

STORE_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an embedded redis-server on 127.0.0.1, shared by the session."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
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
