"""Stage mechanics of the store against a real redis-server: dead letters, retries, column-wise
stages that join, back-pressure, trimming, retention and cluster-ready keys."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from redis.crc import key_slot

from asyncrl.bench.store import synthetic_trajectories
from asyncrl.types import TRAJECTORY_SCHEMA
from storage import Limits, StoreFull, TrajectoryStore
from storage.codec import encode_segment

STREAM, GROUP = "trajectories", "trainer"


def batch(rows: int = 4, prefix: str = "s") -> pa.Table:
    return synthetic_trajectories(rows, prompt_tokens=3, response_tokens=5, id_prefix=prefix)


def payload_keys(store: TrajectoryStore) -> list[str]:
    """The run's payloads (their hashes; each has its segment keys beside it)."""
    return [key for key in store.run_keys() if ":payload:" in key and ":s:" not in key]


def test_corrupt_payload_goes_to_dead_letter_and_the_rest_is_read(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, GROUP)
    good_before = store.put(STREAM, batch(prefix="a"))
    bad = store.put(STREAM, batch(prefix="b"))
    good_after = store.put(STREAM, batch(prefix="c"))
    # Corrupt exactly the middle entry's segment bytes.
    payload_of_bad = store.client.xrange(store.key(STREAM), min=bad, max=bad)[0][1][b"payload"]
    store.client.set(payload_of_bad + b":s:0", b"\x00not arrow at all")

    entries = store.read(STREAM, GROUP, "t0", count=10)

    assert [entry.id for entry in entries] == [good_before, good_after]
    (dead,) = store.dead_letters(STREAM)
    assert dead.entry == bad and dead.group == GROUP
    assert "not valid Arrow IPC" in dead.reason and payload_of_bad.decode().rpartition(":")[2] in dead.reason
    assert store.pending(STREAM, GROUP) == 2  # the bad one is no longer pending anywhere
    assert store.inflight(STREAM)[0] == 2
    assert store.client.exists(dead.payload) == 1  # kept for inspection


def test_wrong_schema_goes_to_dead_letter_naming_the_column(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, GROUP)
    wrong = batch().set_column(TRAJECTORY_SCHEMA.get_field_index("reward"), "reward", pa.array(["x"] * 4))
    entry_id = store.put(STREAM, wrong)

    assert store.read(STREAM, GROUP, "t0", expect=TRAJECTORY_SCHEMA) == []

    (dead,) = store.dead_letters(STREAM)
    assert dead.entry == entry_id
    assert "column 'reward' has type string, expected float" in dead.reason


def test_an_entry_that_keeps_killing_its_consumer_is_dead_lettered(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, GROUP)
    entry_id = store.put(STREAM, batch())
    assert len(store.read(STREAM, GROUP, "c1")) == 1  # delivery 1; c1 dies
    for consumer in ("c2", "c3"):  # deliveries 2 and 3; each dies
        (claimed,) = store.claim_stale(STREAM, GROUP, consumer, min_idle_ms=0)
        assert claimed.id == entry_id

    assert store.claim_stale(STREAM, GROUP, "c4", min_idle_ms=0) == []  # a 4th would exceed max_deliveries=3

    (dead,) = store.dead_letters(STREAM)
    assert dead.entry == entry_id and dead.deliveries == 4
    assert "max_deliveries=3" in dead.reason
    assert store.pending(STREAM, GROUP) == 0
    assert store.inflight(STREAM) == (0, 0)


def test_a_stage_reads_some_columns_and_appends_its_own(store: TrajectoryStore) -> None:
    table = batch(6)
    store.put(STREAM, table, {"rows": 6})
    store.ensure_group(STREAM, "reward")
    store.ensure_group("scored", GROUP)
    (base_payload,) = payload_keys(store)
    base_segment = store.client.get(base_payload + ":s:0")

    (entry,) = store.read(STREAM, "reward", "r0", columns=["sample_id", "response_ids"])
    assert entry.table.column_names == ["sample_id", "response_ids"]
    rewards = pa.table({"score": pa.array([0.5] * 6, pa.float32())})
    scored_id = store.advance(STREAM, "reward", entry.id, "scored", columns=rewards)

    assert scored_id is not None
    (scored,) = store.read("scored", GROUP, "t0")
    assert scored.table.column_names == [*table.column_names, "score"]
    assert scored.table.select(table.column_names).equals(table)
    assert scored.table.column("score").to_pylist() == [0.5] * 6
    assert scored.meta == {"rows": 6}
    assert store.client.get(base_payload + ":s:0") == base_segment  # the first segment was not rewritten
    assert store.pending(STREAM, "reward") == 0
    assert store.inflight(STREAM) == (0, 0) and store.inflight("scored")[0] == 1
    store.ack("scored", GROUP, [scored.id])
    assert payload_keys(store) == []


def test_parallel_stages_join_when_every_column_is_ready(store: TrajectoryStore) -> None:
    store.put(STREAM, batch(3))
    for group in ("reward", "reference"):
        store.ensure_group(STREAM, group)
    store.ensure_group("scored", GROUP)
    ready = ["reward_total", "ref_logprobs"]

    (for_reward,) = store.read(STREAM, "reward", "r0", columns=["response_ids"])
    (for_reference,) = store.read(STREAM, "reference", "f0", columns=["response_ids"])
    reward = pa.table({"reward_total": pa.array([1.0, 0.0, 1.0], pa.float32())})
    assert store.advance(STREAM, "reward", for_reward.id, "scored", reward, ready_when=ready) is None
    assert store.read("scored", GROUP, "t0", block_ms=0) == []  # not ready: the reference is missing

    ref = pa.table({"ref_logprobs": pa.array([[-0.1] * 5] * 3, pa.list_(pa.float32()))})
    joined = store.advance(STREAM, "reference", for_reference.id, "scored", ref, ready_when=ready)

    assert joined is not None
    (scored,) = store.read("scored", GROUP, "t0", columns=["sample_id", *ready])
    assert scored.table.column("reward_total").to_pylist() == [1.0, 0.0, 1.0]
    assert scored.table.column("ref_logprobs").to_pylist()[0] == pytest.approx([-0.1] * 5)
    assert store.length("scored") == 1


def test_advance_by_a_consumer_that_lost_the_entry_writes_nothing(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, "reward")
    store.put(STREAM, batch())
    (slow,) = store.read(STREAM, "reward", "slow")
    (fast,) = store.claim_stale(STREAM, "reward", "fast", min_idle_ms=0)
    assert store.advance(STREAM, "reward", fast.id, "scored", pa.table({"score": [1.0] * 4})) is not None

    assert store.advance(STREAM, "reward", slow.id, "scored", pa.table({"score": [9.0] * 4})) is None

    store.ensure_group("scored", GROUP)
    (scored,) = store.read("scored", GROUP, "t0", columns=["score"])
    assert scored.table.column("score").to_pylist() == [1.0] * 4


def _bounded(store: TrajectoryStore, **limits) -> TrajectoryStore:
    return TrajectoryStore(store.client, store.run_id, store.timeout_s, limits=Limits(**limits))


@pytest.mark.parametrize("bound", [{"max_entries": 3}, {"max_bytes": 3 * 4096}])
def test_a_fast_producer_never_holds_more_than_the_bound(store: TrajectoryStore, bound: dict) -> None:
    producer = _bounded(store, put_timeout_s=20.0, **bound)
    store.ensure_group(STREAM, GROUP)
    one_message = encode_segment(batch(2)).nbytes  # the size the bound counts
    total, held, done = 40, [], threading.Event()

    def produce() -> None:
        for index in range(total):
            producer.put(STREAM, batch(2, prefix=f"m{index}-"))
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    consumed: list[str] = []
    deadline = time.monotonic() + 30
    while len(consumed) < 2 * total and time.monotonic() < deadline:
        held.append(len(payload_keys(store)))  # counted by Redis itself, not by our counters
        for entry in store.read(STREAM, GROUP, "slow", count=1, block_ms=100):
            time.sleep(0.01)  # a consumer slower than the producer
            consumed += entry.table.column("sample_id").to_pylist()
            store.ack(STREAM, GROUP, [entry.id])
    thread.join(timeout=30)

    assert done.is_set() and len(consumed) == 2 * total == len(set(consumed))
    limit = bound.get("max_entries") or bound["max_bytes"] // max(one_message, 1)
    assert max(held) <= max(limit, 1)
    assert producer.put_wait_s > 0  # the producer did wait, and says how long
    assert store.inflight(STREAM) == (0, 0)


def test_a_producer_with_no_consumer_fails_naming_the_stream(store: TrajectoryStore) -> None:
    producer = _bounded(store, max_entries=2, put_timeout_s=0.3)
    producer.put(STREAM, batch())
    producer.put(STREAM, batch())
    started = time.monotonic()

    with pytest.raises(StoreFull, match=r"stream 'trajectories' .* stayed full \(2 entries\) for 0.3s"):
        producer.put(STREAM, batch())

    assert 0.3 <= time.monotonic() - started < 3
    assert store.length(STREAM) == 2 and len(payload_keys(store)) == 2  # the refused batch left nothing


def test_put_many_appends_in_order_and_reads_back_like_single_puts(store: TrajectoryStore) -> None:
    tables = [batch(rows, prefix=f"m{rows}") for rows in (1, 3, 2)]
    ids = store.put_many(STREAM, tables, [{"rows": table.num_rows} for table in tables])
    store.ensure_group(STREAM, GROUP)

    entries = store.read(STREAM, GROUP, "t0", count=10)

    assert [entry.id for entry in entries] == ids
    assert [entry.meta for entry in entries] == [{"rows": 1}, {"rows": 3}, {"rows": 2}]
    assert all(entry.table.equals(table) for entry, table in zip(entries, tables, strict=True))
    assert store.inflight(STREAM)[0] == 3


def test_put_many_past_the_bound_appends_what_fits_and_the_rest_waits_for_room(store: TrajectoryStore) -> None:
    producer = _bounded(store, max_entries=2, put_timeout_s=0.3)

    with pytest.raises(StoreFull, match=r"stream 'trajectories' .* stayed full \(2 entries\)"):
        producer.put_many(STREAM, [batch(prefix=f"f{i}") for i in range(3)])

    assert store.length(STREAM) == 2 and len(payload_keys(store)) == 2  # the refused batch left nothing
    store.ensure_group(STREAM, GROUP)
    first = store.read(STREAM, GROUP, "t0", count=1)
    store.ack(STREAM, GROUP, [entry.id for entry in first])  # room for one: the refused put now goes in
    (third,) = producer.put_many(STREAM, [batch(prefix="f2")])
    assert store.read(STREAM, GROUP, "t0", count=5)[-1].id == third


def test_one_batch_larger_than_the_byte_bound_still_fits_an_empty_stream(store: TrajectoryStore) -> None:
    producer = _bounded(store, max_bytes=16, put_timeout_s=0.2)
    producer.put(STREAM, batch(8))
    with pytest.raises(StoreFull):
        producer.put(STREAM, batch(8))


def test_trim_drops_only_what_every_group_is_done_with(store: TrajectoryStore) -> None:
    ids = [store.put(STREAM, batch(prefix=f"b{i}")) for i in range(6)]
    store.ensure_group(STREAM, GROUP)
    store.ensure_group(STREAM, "audit")
    first_four = store.read(STREAM, GROUP, "t0", count=4)
    store.ack(STREAM, GROUP, [entry.id for entry in first_four[:3]])  # the 4th stays pending
    store.read(STREAM, "audit", "a0", count=2)
    store.client.xack(store.key(STREAM), "audit", *ids[:2])

    assert store.trim(STREAM) == 2  # audit has not been delivered ids[2:] yet
    assert [entry_id.decode() for entry_id, _ in store.client.xrange(store.key(STREAM))] == ids[2:]

    rest = store.read(STREAM, "audit", "a0", count=10)
    store.client.xack(store.key(STREAM), "audit", *[entry.id for entry in rest])
    assert store.trim(STREAM) == 1  # trainer still holds ids[3] and has not read ids[4:]
    assert store.length(STREAM) == 3


def test_checkpoint_retention_keeps_payloads_until_released(store: TrajectoryStore) -> None:
    keeping = TrajectoryStore(store.client, store.run_id, store.timeout_s, retention="checkpoint")
    keeping.ensure_group(STREAM, GROUP)
    keeping.put(STREAM, batch())
    keeping.put(STREAM, batch())
    entries = keeping.read(STREAM, GROUP, "t0", count=2)
    keeping.ack(STREAM, GROUP, [entry.id for entry in entries])

    assert len(payload_keys(store)) == 2 and keeping.pending(STREAM, GROUP) == 0
    assert keeping.release_retired() == 2
    assert payload_keys(store) == []


def test_every_key_of_a_run_is_in_one_cluster_slot(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, "reward")
    store.put(STREAM, batch())
    (entry,) = store.read(STREAM, "reward", "r0")
    store.advance(STREAM, "reward", entry.id, "scored", pa.table({"score": [1.0] * 4}))
    store.dead_letter(STREAM, "reward", entry.id, "test")
    store.set_value("policy_version", 3)

    keys = store.run_keys()

    assert len(keys) >= 5
    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_touch_keeps_a_slow_but_alive_consumer_s_entries(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, GROUP)
    store.put(STREAM, batch(prefix="slow"))
    store.put(STREAM, batch(prefix="dead"))
    slow, dead = store.read(STREAM, GROUP, "slow", count=1) + store.read(STREAM, GROUP, "dead", count=1)
    time.sleep(0.25)

    assert store.touch(STREAM, GROUP, "slow", [slow.id]) == 1
    claimed = store.claim_stale(STREAM, GROUP, "survivor", min_idle_ms=200)

    assert [entry.id for entry in claimed] == [dead.id]
    assert store.ack(STREAM, GROUP, [slow.id]) == 1  # still the slow consumer's to finish
