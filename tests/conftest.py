"""Shared fixtures: one real redis-server per test session, one fresh run per test."""

from __future__ import annotations

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
