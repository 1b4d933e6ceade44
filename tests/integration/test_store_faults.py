"""The store under real faults: a consumer process killed with SIGKILL between read and ack, and
a redis-server with AOF killed and restarted. Nothing is lost and nothing is used twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from asyncrl.bench.store import synthetic_trajectories
from storage import EmbeddedRedis, TrajectoryStore, connect

STREAM, GROUP = "trajectories", "trainer"

CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    from storage import TrajectoryStore, connect
    url, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = TrajectoryStore(connect(url, 5.0), run_id, 5.0)
    entries = store.read("trajectories", "trainer", "doomed", count=count, block_ms=2000)
    print(json.dumps([entry.id for entry in entries]), flush=True)
    time.sleep(120)  # "training": killed before it can ack
    """
)


def _batch(index: int):
    return synthetic_trajectories(4, prompt_tokens=3, response_tokens=6, id_prefix=f"b{index}-")


def test_a_consumer_killed_between_read_and_ack_loses_nothing(store: TrajectoryStore, redis_url: str) -> None:
    put = [store.put(STREAM, _batch(index)) for index in range(8)]
    store.ensure_group(STREAM, GROUP)
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, redis_url, store.run_id, "3"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        taken = json.loads(consumer.stdout.readline())
    finally:
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait(timeout=10)
    assert taken == put[:3] and consumer.returncode == -signal.SIGKILL
    assert store.pending(STREAM, GROUP) == 3

    trained: list[str] = []

    def train(entries) -> None:
        for entry in entries:
            if store.ack(STREAM, GROUP, [entry.id]) == 1:  # only the owner's ack counts
                trained.extend(entry.table.column("sample_id").to_pylist())

    train(store.read(STREAM, GROUP, "survivor", count=100))  # the 5 never delivered
    assert store.claim_stale(STREAM, GROUP, "survivor", min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.3)
    train(store.claim_stale(STREAM, GROUP, "survivor", min_idle_ms=200))

    expected = [f"b{index}-{row}" for index in range(8) for row in range(4)]
    assert sorted(trained) == sorted(expected)  # every sample trained, none twice
    assert store.pending(STREAM, GROUP) == 0 and store.inflight(STREAM) == (0, 0)


def test_unacked_entries_survive_a_killed_redis_with_aof(tmp_path: Path) -> None:
    password, run_id = uuid.uuid4().hex, f"aof-{uuid.uuid4().hex[:8]}"
    server = EmbeddedRedis(tmp_path, appendonly=True, password=password).start()
    port = server.port
    store = TrajectoryStore(connect(server.url, 5.0), run_id, 5.0)
    store.ensure_group(STREAM, GROUP)
    tables = [_batch(index) for index in range(5)]
    ids = [store.put(STREAM, table) for table in tables]
    held = store.read(STREAM, GROUP, "t0", count=3)
    store.ack(STREAM, GROUP, [held[0].id])

    os.kill(server.pid, signal.SIGKILL)  # no shutdown, no final fsync
    server.stop()
    store.client.close()
    restarted = EmbeddedRedis(tmp_path, appendonly=True, password=password, port=port).start()
    try:
        after = TrajectoryStore(connect(restarted.url, 5.0), run_id, 5.0)

        assert after.length(STREAM) == 5
        assert after.pending(STREAM, GROUP) == 2
        reclaimed = after.claim_stale(STREAM, GROUP, "t1", min_idle_ms=0)
        unread = after.read(STREAM, GROUP, "t1", count=10)
        assert [entry.id for entry in reclaimed] == ids[1:3]
        assert [entry.id for entry in unread] == ids[3:]
        for entry in reclaimed + unread:
            assert entry.table.equals(tables[ids.index(entry.id)])
        # The script cache died with the server; acks reload it and still free the payloads.
        assert after.ack(STREAM, GROUP, [entry.id for entry in reclaimed + unread]) == 4
        assert after.inflight(STREAM) == (0, 0)
        assert [key for key in after.run_keys() if ":payload:" in key] == []
        after.client.close()
    finally:
        restarted.stop()


def test_a_restarted_consumer_takes_back_only_its_own_entries(store: TrajectoryStore) -> None:
    ids = [store.put(STREAM, _batch(index)) for index in range(4)]
    store.ensure_group(STREAM, GROUP)
    store.read(STREAM, GROUP, "w0", count=2)  # then w0's process dies
    store.read(STREAM, GROUP, "w1", count=2)  # alive, still working on these
    back = store.claim_stale(STREAM, GROUP, "w0", min_idle_ms=0, owner="w0")
    assert [entry.id for entry in back] == ids[:2]
    assert store.claim_stale(STREAM, GROUP, "w0", min_idle_ms=60_000, owner="w1") == []  # w1's are not idle
    assert store.ack(STREAM, GROUP, ids) == 4 and store.inflight(STREAM) == (0, 0)
