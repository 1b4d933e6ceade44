"""What is in a store: its runs, and per stream of a run its entries, bytes, groups and lag.

Read-only except ``TrajectoryStore.purge``; everything goes through SCAN and per-key commands,
so it is safe to run against a live store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import redis

from storage.store import DEAD_SUFFIX, KEY_PREFIX, TrajectoryStore

_RUN_KEY = re.compile(rb"^" + KEY_PREFIX.encode() + rb":\{([^}]+)\}:")


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: str
    keys: int
    bytes: int
    """Memory Redis reports for the run's keys."""


@dataclass(frozen=True, slots=True)
class GroupStats:
    name: str
    consumers: int
    pending: int
    lag: int | None
    """Entries not yet delivered to the group (None where the server does not say: Redis < 7)."""


@dataclass(frozen=True, slots=True)
class StreamStats:
    name: str
    length: int
    inflight_entries: int
    inflight_bytes: int
    dead_letters: int
    groups: list[GroupStats] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunStats:
    run_id: str
    streams: list[StreamStats]
    payloads: int
    payload_bytes: int
    keys: int


def list_runs(client: redis.Redis) -> list[RunSummary]:
    """Every run with keys in the store, by run id."""
    counts: dict[str, list[int]] = {}
    pattern = KEY_PREFIX + ":{*"
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key)
        for key, size in zip(batch, pipe.execute(), strict=True):
            run_id = _RUN_KEY.match(key).group(1).decode()
            entry = counts.setdefault(run_id, [0, 0])
            entry[0] += 1
            entry[1] += int(size or 0)
        batch.clear()

    for key in client.scan_iter(match=pattern, count=1000):
        if _RUN_KEY.match(key):
            batch.append(key)
            if len(batch) == 1000:
                flush()
    if batch:
        flush()
    return [RunSummary(run_id, keys, size) for run_id, (keys, size) in sorted(counts.items())]


def run_stats(store: TrajectoryStore) -> RunStats:
    """Streams, consumer groups, in-flight bounds and payloads of ``store``'s run."""
    client = store.client
    keys = store.run_keys()
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    types = dict(
        zip(keys, (kind.decode() if isinstance(kind, bytes) else kind for kind in pipe.execute()), strict=True)
    )
    payloads = [key for key in keys if key.startswith(store.prefix + "payload:")]
    payload_bytes = 0
    if payloads:
        pipe = client.pipeline(transaction=False)
        for key in payloads:
            pipe.memory_usage(key)
        payload_bytes = sum(int(size or 0) for size in pipe.execute())
    streams = []
    for key in sorted(key for key, kind in types.items() if kind == "stream" and not key.endswith(DEAD_SUFFIX)):
        name = key[len(store.prefix) :]
        entries, in_bytes = store.inflight(name)
        dead = store.dead_letter_count(name)
        groups = [
            GroupStats(
                name=_text(info["name"]),
                consumers=int(info["consumers"]),
                pending=int(info["pending"]),
                lag=int(info["lag"]) if info.get("lag") is not None else None,
            )
            for info in client.xinfo_groups(key)
        ]
        streams.append(StreamStats(name, int(client.xlen(key)), entries, in_bytes, dead, groups))
    return RunStats(store.run_id, streams, len(payloads), payload_bytes, len(keys))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
