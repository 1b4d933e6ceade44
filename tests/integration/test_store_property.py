"""Property: under any sequence of puts, reads, acks, reclaims and consumer crashes (a crash is a
consumer that read and never acknowledged), no sample is lost and none is trained twice.

Runs against a real redis-server. "Trained" means acknowledged by the consumer that held the
entry (an ack that returns 0 means someone else finished it, and the trainer must not step on
it). A consumer that crashes never comes back under its name, as a restarted process would not.
"""

from __future__ import annotations

import uuid

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from asyncrl.bench.store import synthetic_trajectories
from storage import TrajectoryStore, connect

STREAM, GROUP = "trajectories", "trainer"


def build_machine(redis_url: str) -> type[RuleBasedStateMachine]:
    class StoreMachine(RuleBasedStateMachine):
        @initialize()
        def open(self) -> None:
            self.store = TrajectoryStore(connect(redis_url, 5.0), f"prop-{uuid.uuid4().hex[:10]}", 5.0)
            self.store.ensure_group(STREAM, GROUP)
            self.samples: dict[str, list[str]] = {}  # entry id -> its sample ids
            self.corrupt: set[str] = set()
            self.trained: list[str] = []
            self.finished: set[str] = set()  # entry ids acknowledged by their owner
            self.incarnation = 0

        def teardown(self) -> None:
            if hasattr(self, "store"):
                self.store.purge()
                self.store.client.close()

        def _consumer(self, index: int) -> str:
            return f"c{index}-{self.incarnation}"

        def _train_or_crash(self, entries, crash: bool) -> None:
            if crash:
                self.incarnation += 1  # it dies holding the entries; its successor has a new name
                return
            for entry in entries:
                assert entry.id not in self.corrupt, "a corrupt payload reached training"
                if self.store.ack(STREAM, GROUP, [entry.id]) == 1:
                    ids = entry.table.column("sample_id").to_pylist()
                    assert not set(ids) & set(self.trained), f"trained twice: {set(ids) & set(self.trained)}"
                    self.trained += ids
                    self.finished.add(entry.id)

        @rule(rows=st.integers(1, 4), corrupt=st.booleans().map(lambda b: b and uuid.uuid4().int % 4 == 0))
        def put(self, rows: int, corrupt: bool) -> None:
            prefix = f"e{len(self.samples)}-"
            table = synthetic_trajectories(rows, prompt_tokens=2, response_tokens=3, id_prefix=prefix)
            entry_id = self.store.put(STREAM, table)
            self.samples[entry_id] = table.column("sample_id").to_pylist()
            if corrupt:
                payload = self.store.client.xrange(self.store.key(STREAM), min=entry_id, max=entry_id)[0][1][b"payload"]
                self.store.client.set(payload + b":s:0", b"garbage")
                self.corrupt.add(entry_id)

        @rule(consumer=st.integers(0, 2), count=st.integers(1, 3), crash=st.booleans())
        def consume(self, consumer: int, count: int, crash: bool) -> None:
            entries = self.store.read(STREAM, GROUP, self._consumer(consumer), count=count, block_ms=0)
            self._train_or_crash(entries, crash)

        @rule(consumer=st.integers(0, 2), count=st.integers(1, 3), crash=st.booleans())
        def reclaim(self, consumer: int, count: int, crash: bool) -> None:
            # Between rules no live consumer holds an entry, so idle 0 takes only the dead's.
            entries = self.store.claim_stale(STREAM, GROUP, self._consumer(consumer), min_idle_ms=0, count=count)
            self._train_or_crash(entries, crash)

        @invariant()
        def nothing_lost(self) -> None:
            if not hasattr(self, "store"):
                return
            dead = {letter.entry for letter in self.store.dead_letters(STREAM)}
            assert not dead & self.finished
            outstanding = set(self.samples) - dead - self.finished
            assert self.store.inflight(STREAM)[0] == len(outstanding)
            pending = self.store.pending(STREAM, GROUP)
            assert pending <= len(outstanding)

        def drain(self) -> None:
            """After the random part: a healthy consumer finishes everything left."""
            for _ in range(4 * len(self.samples) + 2):
                entries = self.store.read(STREAM, GROUP, "drain", count=50, block_ms=0)
                entries += self.store.claim_stale(STREAM, GROUP, "drain", min_idle_ms=0, count=50)
                if not entries and not self.store.pending(STREAM, GROUP):
                    break
                self._train_or_crash(entries, crash=False)
            dead = {letter.entry for letter in self.store.dead_letters(STREAM)}
            assert self.corrupt <= dead
            expected = sorted(s for entry_id, ids in self.samples.items() if entry_id not in dead for s in ids)
            assert sorted(self.trained) == expected
            assert self.finished | dead == set(self.samples)
            assert self.store.inflight(STREAM) == (0, 0)

    class DrainingMachine(StoreMachine):
        def teardown(self) -> None:
            try:
                if hasattr(self, "store"):
                    self.drain()
            finally:
                super().teardown()

    return DrainingMachine


def test_no_sample_is_lost_or_trained_twice(redis_url: str) -> None:
    run_state_machine_as_test(
        lambda: build_machine(redis_url)(),
        settings=settings(max_examples=30, stateful_step_count=25, deadline=None),
    )
