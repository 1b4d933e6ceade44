"""The transfer store: Redis Streams carry control, Arrow IPC carries payloads (DESIGN §4).

One stream per stage. ``put`` appends a record batch; the consumers of a stage share a consumer
group and ``read`` batches no one else got; ``ack`` ends an entry's life (freeing its payload),
``advance`` adds a stage's columns and hands the entry to the next stage's stream, and
``claim_stale`` takes over what a dead consumer read but never acknowledged. An entry that keeps
failing (delivered ``max_deliveries`` times, or a payload that does not decode) moves to the
stream's dead-letter stream ``<stream>:dead`` with the reason, and the stage goes on. A read or claim
that a dropped connection made the client retry also hands out the entries its lost reply had delivered
(``storage.delivered``), so a restarted server strands nothing with a live consumer.

Back-pressure: ``limits`` bound the entries and bytes in flight on a stream (put and not yet
acknowledged or advanced); ``put`` waits, up to its timeout, while the stream is full, and the
time it waited is added to ``put_wait_s``.

Every key of a run is ``asyncrl:{<run_id>}:<name>``: the braces are a Redis Cluster hash tag,
so all keys of a run live in one slot and the transactions and scripts below stay valid on a
cluster. Every call is bounded by the client's socket timeout; a blocking read is shortened so
that it always returns before that timeout fires.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgpack
import pyarrow as pa
import redis

from storage import scripts
from storage.client import StoreError, connect
from storage.codec import (
    ORDER_FIELD,
    PayloadError,
    Segment,
    decode_columns,
    encode_segment,
    needed_segments,
    segment_field,
    segment_key,
    stored_names,
)
from storage.delivered import Delivered
from storage.wire import set_then, set_then_many

log = logging.getLogger(__name__)

KEY_PREFIX = "asyncrl"
DEAD_SUFFIX = ":dead"
INFLIGHT_SUFFIX = ":inflight"
PUT_MARK_TTL_S = 600
"""Life of a put's mark (``put:<id>``, the entry id it appended, so that a retried put appends no second
entry); a retry comes within the client's reconnect budget (store.reconnect_s, at most half of this)."""
RETENTION_MODES = ("ack", "checkpoint")
LOST_REPLIES = "lost_replies"
"""The run's counter of entries handed out again after a lost reply (``Delivered``), whichever client found them."""

# A blocking XREADGROUP is answered by the server only when the block ends, so the block must
# end this long before the client's socket timeout, or a quiet stream reads as a dead server.
_BLOCK_MARGIN_MS = 1000
_PENDING_PAGE = 1000
"""Pending entries listed per XPENDING call when a client looks through a consumer's whole pending list."""
_MAX_PUT_POLL_S = 0.05


class StoreFull(StoreError):
    """A stream stayed at its in-flight bound for the whole put timeout."""


@dataclass(frozen=True, slots=True)
class Limits:
    """In-flight bounds of every stream of a store; 0 means unbounded."""

    max_entries: int = 0
    max_bytes: int = 0
    put_timeout_s: float = 60.0
    """Longest ``put`` waits for room before raising ``StoreFull``."""

    def __post_init__(self) -> None:
        if self.max_entries < 0 or self.max_bytes < 0 or self.put_timeout_s <= 0:
            raise ValueError(f"limits must be >= 0 and put_timeout_s > 0, got {self}")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: a record batch and the metadata it was put with."""

    id: str
    """Stream entry id, the handle for ``ack`` and ``advance``."""
    table: pa.Table
    """The payload (only the asked-for columns when ``read(columns=...)``)."""
    meta: dict
    """The ``meta`` dict given to ``put``."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry taken out of its stage, with why."""

    id: str
    """Id on the dead-letter stream."""
    entry: str
    """Id the entry had on its stream."""
    group: str
    reason: str
    deliveries: int
    payload: str
    """Key of the payload, kept for inspection until the run is purged."""


@dataclass(frozen=True, slots=True)
class _Put:
    """One table to append, encoded; ``put_id`` stays the same whatever is retried (the script appends it once)."""

    table: pa.Table
    data: Segment
    meta: bytes
    put_id: str

    @classmethod
    def of(cls, table: pa.Table, meta: dict | None) -> _Put:
        return cls(table, encode_segment(table), msgpack.packb(meta or {}, use_bin_type=True), uuid.uuid4().hex)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _escape_glob(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def run_prefix(run_id: str) -> str:
    return f"{KEY_PREFIX}:{{{run_id}}}:"


class TrajectoryStore:
    """Streams of Arrow record batches for one run, read through consumer groups.

    ``client`` should come from ``connect`` (bounded timeouts, bytes responses); ``timeout_s``
    is its socket timeout, used to keep blocking reads shorter than it. ``retention`` is what
    ``ack`` does with a payload: ``ack`` deletes it, ``checkpoint`` keeps it in the run's retired
    set until ``release_retired`` (called once a checkpoint no longer needs it).
    """

    def __init__(
        self,
        client: redis.Redis,
        run_id: str,
        timeout_s: float,
        *,
        limits: Limits | None = None,
        max_deliveries: int = 3,
        retention: str = "ack",
    ) -> None:
        if not run_id or any(char in run_id for char in "{}"):
            raise ValueError(f"run_id must be non-empty and free of braces, got {run_id!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if retention not in RETENTION_MODES:
            raise ValueError(f"retention must be one of {', '.join(RETENTION_MODES)}, got {retention!r}")
        self.client = client
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.limits = limits or Limits()
        self.max_deliveries = max_deliveries
        self.retention = retention
        self.prefix = run_prefix(run_id)
        timeout_ms = int(timeout_s * 1000)
        self.max_block_ms = max(1, timeout_ms - min(_BLOCK_MARGIN_MS, timeout_ms // 2))
        self.put_wait_s = 0.0
        """Seconds ``put`` has waited for room on a full stream, in total."""
        self.lost_replies = 0
        """Entries found again that a reply lost to a dropped connection had delivered (see ``Delivered``)."""
        self._delivered = Delivered()
        self._put = client.register_script(scripts.PUT)
        self._ack = client.register_script(scripts.ACK)
        self._advance = client.register_script(scripts.ADVANCE)
        self._dead_letter = client.register_script(scripts.DEAD_LETTER)
        self._free = client.register_script(scripts.FREE)
        self._load_scripts()

    @classmethod
    def from_config(cls, url: str, run_id: str, settings: Any) -> TrajectoryStore:
        """A store for run ``run_id`` at ``url`` with the bounds and policies of ``settings`` (a
        ``StoreConfig``: ``timeout_s``, TLS files, in-flight bounds, deliveries, retention)."""
        client = connect(
            url,
            settings.timeout_s,
            settings.reconnect_s,
            ssl_ca_certs=settings.tls_ca_certs,
            ssl_certfile=settings.tls_certfile,
            ssl_keyfile=settings.tls_keyfile,
        )
        limits = Limits(
            max_entries=settings.max_inflight_entries,
            max_bytes=int(settings.max_inflight_mb * 2**20),
            put_timeout_s=settings.put_timeout_s,
        )
        return cls(
            client,
            run_id,
            settings.timeout_s,
            limits=limits,
            max_deliveries=settings.max_deliveries,
            retention=settings.retention,
        )

    def close(self) -> None:
        self.client.close()

    def key(self, name: str) -> str:
        """The full Redis key of ``name`` in this run."""
        return self.prefix + name

    # -- producing -----------------------------------------------------------------------------

    def put(self, stream: str, table: pa.Table, meta: dict | None = None) -> str:
        """Append ``table`` to ``stream``; returns the entry id.

        Waits while the stream is at its in-flight bound; raises ``StoreFull`` after
        ``limits.put_timeout_s``. The batch's bytes are written before the script that appends
        the entry, so a reader never sees an entry whose payload is not all there.
        """
        return self._put_until_room(stream, _Put.of(table, meta))

    def put_many(
        self, stream: str, tables: Sequence[pa.Table], metas: Sequence[dict | None] | None = None
    ) -> list[str]:
        """``put`` of each table (with ``metas[i]``), all sent in one round trip; returns the entry ids, in order.

        Entries are appended in the order given; one that finds the stream at its bound waits for room as ``put``
        does, after the others were sent, so it (and any other refused one) comes after the accepted ones.
        """
        metas = [None] * len(tables) if metas is None else metas
        if len(metas) != len(tables):
            raise ValueError(f"put_many: {len(tables)} tables, {len(metas)} metas")
        puts = [_Put.of(table, meta) for table, meta in zip(tables, metas, strict=True)]
        stream_key = self.key(stream)
        try:
            replies = set_then_many(self.client, [self._put_write(stream_key, put) for put in puts])
        except redis.exceptions.NoScriptError:  # a restarted server lost its script cache; the puts are idempotent
            self._load_scripts()
            replies = set_then_many(self.client, [self._put_write(stream_key, put) for put in puts])
        return [
            _text(reply) if reply is not None else self._put_until_room(stream, put)
            for put, reply in zip(puts, replies, strict=True)
        ]

    def _put_until_room(self, stream: str, put: _Put) -> str:
        stream_key = self.key(stream)
        started, pause = None, 0.001
        while (entry_id := self._try_put(stream_key, put)) is None:
            # Full: wait with cheap polls of the counters, not by resending the bytes.
            started = started if started is not None else time.monotonic()
            while not self._has_room(stream, put.data.nbytes):
                if time.monotonic() - started >= self.limits.put_timeout_s:
                    raise StoreFull(
                        f"stream {stream!r} of run {self.run_id!r} stayed full ({self._bound_text()}) for "
                        f"{self.limits.put_timeout_s:g}s: its consumer is not keeping up or is gone"
                    )
                time.sleep(pause)
                pause = min(2 * pause, _MAX_PUT_POLL_S)
        if started is not None:
            self.put_wait_s += time.monotonic() - started
        return _text(entry_id)

    def _try_put(self, stream_key: str, put: _Put) -> str | None:
        # Not a MULTI: the segment is written first and only an entry that the script appends
        # points at it, so no reader can see a half-written batch; a refused put deletes it.
        # A put retried after a lost reply (the client reconnects) finds its own entry and returns it.
        key, data, command = self._put_write(stream_key, put)
        try:
            entry_id = set_then(self.client, key, data, *command)
        except redis.exceptions.NoScriptError:  # a restarted server lost its script cache
            # The segment stays: an attempt before the restart may have appended the entry that uses it.
            self._load_scripts()
            return self._try_put(stream_key, put)
        return None if entry_id is None else _text(entry_id)

    def _put_write(self, stream_key: str, put: _Put) -> tuple[str, Segment, tuple]:
        """The segment's key, the segment and the script call that appends ``put``'s entry (``set_then``)."""
        payload_key = self.key(f"payload:{put.put_id}")
        segment = segment_key(payload_key, "0")
        field, names = segment_field(put.table, segment)
        limits = self.limits
        command = (
            "EVALSHA", self._put.sha, 5, stream_key, payload_key, stream_key + INFLIGHT_SUFFIX, segment,
            self.key(f"put:{put.put_id}"), limits.max_entries, limits.max_bytes, put.data.nbytes, put.table.num_rows,
            put.meta, PUT_MARK_TTL_S, ORDER_FIELD, names, field, names,
        )  # fmt: skip
        return segment, put.data, command

    def _load_scripts(self) -> None:
        for script in (self._put, self._ack, self._advance, self._dead_letter, self._free):
            script.sha = self.client.script_load(script.script)

    def _has_room(self, stream: str, size: int) -> bool:
        entries, in_bytes = self.inflight(stream)
        if entries == 0:
            return True
        if self.limits.max_entries and entries >= self.limits.max_entries:
            return False
        return not (self.limits.max_bytes and in_bytes + size > self.limits.max_bytes)

    def _bound_text(self) -> str:
        parts = []
        if self.limits.max_entries:
            parts.append(f"{self.limits.max_entries} entries")
        if self.limits.max_bytes:
            parts.append(f"{self.limits.max_bytes / 2**20:g} MiB")
        return " or ".join(parts)

    # -- consuming -----------------------------------------------------------------------------

    def ensure_group(self, stream: str, group: str) -> None:
        """Create ``group`` on ``stream`` (and the stream) reading from the start; no-op if it exists."""
        try:
            self.client.xgroup_create(self.key(stream), group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int = 1,
        block_ms: int = 1000,
        columns: Sequence[str] | None = None,
        expect: pa.Schema | None = None,
    ) -> list[Entry]:
        """Up to ``count`` entries of ``stream`` never delivered to ``group`` before.

        Waits at most ``block_ms`` (capped below the socket timeout; <= 0 does not wait) for the
        first entry; returns ``[]`` if none came. The entries stay pending for ``consumer``
        until ``ack`` or ``advance``. ``columns`` selects the payload columns to fetch (only
        those bytes leave Redis). An entry whose payload lacks one of them, does not decode, or
        (with ``expect``) has a column of another type goes to the dead-letter stream instead,
        with the reason; the read returns the others. A read whose connection dropped and was retried also
        returns, first, the entries an earlier try's lost reply delivered (so it may return more than ``count``).
        """
        block = min(block_ms, self.max_block_ms) if block_ms > 0 else None
        stream_key = self.key(stream)
        records = self._deliver(
            stream_key,
            group,
            consumer,
            lambda: _stream_records(
                self.client.xreadgroup(group, consumer, {stream_key: ">"}, count=count, block=block)
            ),
        )
        return self._load(stream, group, records, columns, expect, deliveries={})

    def _deliver(self, stream_key: str, group: str, consumer: str, fetch: Callable[[], list]) -> list:
        """The records of ``fetch``, a call that makes entries pending for ``consumer``, noted as handed out. If the
        call had to reconnect (the server was restarted), an earlier try's reply may have been lost with entries it
        delivered: the consumer's pending entries never handed out come first."""
        with self._delivered.lock:
            before = _reconnects(self.client)
            records = fetch()
            ids = [_text(record[0]) for record in records]
            if _reconnects(self.client) != before:
                lost = self._lost(stream_key, group, consumer, set(ids))
                records, ids = lost + records, [_text(record[0]) for record in lost] + ids
            if self._delivered.add(stream_key, group, consumer, ids):
                self._delivered.keep(stream_key, group, consumer, self._pending_ids(stream_key, group, consumer))
        return records

    def _pending_ids(self, stream_key: str, group: str, consumer: str) -> list[str]:
        """Every id pending for ``consumer``, oldest first, a page at a time."""
        ids: list[str] = []
        start: str = "-"
        while True:
            rows = self.client.xpending_range(
                stream_key, group, min=start, max="+", count=_PENDING_PAGE, consumername=consumer
            )
            ids.extend(_text(row["message_id"]) for row in rows)
            if len(rows) < _PENDING_PAGE:
                return ids
            start = "(" + ids[-1]  # exclusive: after the last one listed

    def _lost(self, stream_key: str, group: str, consumer: str, got: set[str]) -> list:
        pending = [entry_id for entry_id in self._pending_ids(stream_key, group, consumer) if entry_id not in got]
        lost = self._delivered.unseen(stream_key, group, consumer, pending)
        if not lost:
            return []
        claimed = [
            record for record in self.client.xclaim(stream_key, group, consumer, 0, lost) if record[0] is not None
        ]
        self.lost_replies += len(claimed)
        self.incr(LOST_REPLIES, len(claimed))
        log.warning(
            "store: %d entries of %s delivered to %s in a reply the dropped connection lost; handed out again",
            len(claimed), stream_key, consumer,
        )  # fmt: skip
        return claimed

    def handed_out(self, stream: str, group: str, consumer: str) -> int:
        """Entries this client handed to ``consumer`` that it does not know acknowledged (see ``Delivered``)."""
        return self._delivered.count(self.key(stream), group, consumer)

    def ack(self, stream: str, group: str, ids: Iterable[str]) -> int:
        """Acknowledge entries of ``group``; returns how many were pending.

        Ack ends the entry's life: its payload is deleted (or retired, with ``retention``
        ``checkpoint``), so the group that acks must be the payload's last reader; a stage
        that hands its rows on uses ``advance`` instead.
        """
        ids = list(ids)
        if not ids:
            return 0
        stream_key = self.key(stream)
        mode = "delete" if self.retention == "ack" else "retire"
        keys = [stream_key, stream_key + INFLIGHT_SUFFIX, self.key("retired")]
        acked = int(self._ack(keys=keys, args=[group, mode, *ids]))
        self._delivered.drop(stream_key, group, ids)
        return acked

    def advance(
        self,
        stream: str,
        group: str,
        entry_id: str,
        to: str,
        columns: pa.Table | None = None,
        ready_when: Sequence[str] = (),
        meta: dict | None = None,
    ) -> str | None:
        """Add ``columns`` to an entry's payload and hand it to stream ``to``, in one atomic step.

        The existing columns are not rewritten. ``ready_when`` names columns the next stage
        needs: the entry reaches ``to`` only once all of them are present, so stages running in
        parallel (rewards, reference log-probs, each its own group on ``stream``) join there, and
        a reader of ``to`` always gets rows with those columns ready. Returns the id on ``to``,
        or None when the entry is still waiting for another stage's columns or was no longer
        pending for ``group`` (another consumer finished it first: nothing is written).
        """
        source, target = self.key(stream), self.key(to)
        ready = list(ready_when)
        packed_meta = msgpack.packb(meta, use_bin_type=True) if meta is not None else b""
        segment, new_fields, data = "", [], None
        if columns is not None and columns.num_columns:
            payload_key = self._payload_of(stream, entry_id)
            if payload_key is None:
                return None
            segment = segment_key(payload_key, uuid.uuid4().hex[:12])
            segment_field(columns, segment)  # checks the names
            new_fields = list(columns.column_names)
            data = encode_segment(columns)
        command = (
            "EVALSHA", self._advance.sha, 5, source, source + INFLIGHT_SUFFIX, target, target + INFLIGHT_SUFFIX,
            segment, group, entry_id, len(ready), *ready, packed_meta, *new_fields,
        )  # fmt: skip
        try:
            result = (
                self.client.execute_command(*command)
                if data is None
                else set_then(self.client, segment, data, *command)
            )
        except redis.exceptions.NoScriptError:
            if segment:
                self.client.delete(segment)
            self._load_scripts()
            return self.advance(stream, group, entry_id, to, columns, ready_when, meta)
        self._delivered.drop(source, group, [entry_id])  # the script acknowledged it, whatever it returned
        return None if result in (None, 0) else _text(result)

    def _payload_of(self, stream: str, entry_id: str) -> str | None:
        found = self.client.xrange(self.key(stream), min=entry_id, max=entry_id)
        return _text(found[0][1][b"payload"]) if found else None

    def claim_stale(
        self,
        stream: str,
        group: str,
        consumer: str,
        min_idle_ms: int,
        count: int = 10,
        columns: Sequence[str] | None = None,
        expect: pa.Schema | None = None,
        owner: str | None = None,
    ) -> list[Entry]:
        """Take over up to ``count`` entries another consumer read but has not acknowledged for
        ``min_idle_ms``; they become pending for ``consumer``. With ``owner``, only the entries
        pending for that consumer: a restarted consumer takes back its own under its old name.

        An entry already delivered ``max_deliveries`` times (it made every consumer that took it
        die or fail) goes to the dead-letter stream instead of being handed out again.
        """
        stream_key = self.key(stream)
        fetch = (
            partial(self._claim_from, stream_key, group, consumer, owner, min_idle_ms, count)
            if owner is not None
            else partial(self._autoclaim, stream_key, group, consumer, min_idle_ms, count)
        )
        records = self._deliver(stream_key, group, consumer, fetch)
        deliveries = self._deliveries(stream_key, group, [_text(entry_id) for entry_id, _ in records])
        usable = []
        for record in records:
            entry_id = _text(record[0])
            times = deliveries.get(entry_id, 0)
            if times > self.max_deliveries:
                reason = f"delivered {times} times and never acknowledged (max_deliveries={self.max_deliveries})"
                self.dead_letter(stream, group, entry_id, reason, times)
            else:
                usable.append(record)
        return self._load(stream, group, usable, columns, expect, deliveries)

    def _claim_from(self, stream_key: str, group: str, consumer: str, owner: str, min_idle_ms: int, count: int) -> list:
        held = self.client.xpending_range(
            stream_key, group, min="-", max="+", count=count, consumername=owner, idle=min_idle_ms
        )
        ids = [row["message_id"] for row in held]
        claimed = self.client.xclaim(stream_key, group, consumer, min_idle_ms, ids) if ids else []
        return [record for record in claimed if record[0] is not None]

    def _autoclaim(self, stream_key: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list:
        records: list[tuple[Any, dict]] = []
        cursor: bytes | str = "0-0"
        # XAUTOCLAIM scans a bounded slice of the pending list per call; follow its cursor
        # through the list once.
        while len(records) < count:
            cursor, claimed, *_ = self.client.xautoclaim(
                stream_key, group, consumer, min_idle_ms, start_id=cursor, count=count - len(records)
            )
            records.extend(record for record in claimed if record[0] is not None)
            if _text(cursor) == "0-0":
                break
        return records

    def touch(self, stream: str, group: str, consumer: str, ids: Iterable[str]) -> int:
        """Reset the idle time of entries ``consumer`` still holds, so ``claim_stale`` does not take
        them from a consumer that is alive but slow; returns how many it still holds."""
        ids = list(ids)
        if not ids:
            return 0
        held = self.client.xclaim(self.key(stream), group, consumer, 0, ids, justid=True)
        return len(held)

    def _deliveries(self, stream_key: str, group: str, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(stream_key, group, min=entry_id, max=entry_id, count=1)
        found = {}
        for rows in pipe.execute():
            for row in rows:
                found[_text(row["message_id"])] = int(row["times_delivered"])
        return found

    def dead_letter(self, stream: str, group: str, entry_id: str, reason: str, deliveries: int = 1) -> bool:
        """Move a pending entry of ``group`` to ``<stream>:dead`` with ``reason``; False if it was not pending."""
        stream_key = self.key(stream)
        keys = [stream_key, stream_key + INFLIGHT_SUFFIX, stream_key + DEAD_SUFFIX]
        moved = self._dead_letter(keys=keys, args=[group, entry_id, reason, deliveries])
        self._delivered.drop(stream_key, group, [entry_id])
        if moved is not None:
            log.error(
                "store: entry %s of %s (group %s) moved to the dead-letter stream: %s", entry_id, stream, group, reason
            )
        return moved is not None

    def dead_letter_count(self, stream: str) -> int:
        """Entries of ``stream`` moved to its dead-letter stream so far."""
        return int(self.client.xlen(self.key(stream) + DEAD_SUFFIX))

    def dead_letters(self, stream: str, count: int = 1000) -> list[DeadLetter]:
        """The first ``count`` entries of ``stream``'s dead-letter stream."""
        records = self.client.xrange(self.key(stream) + DEAD_SUFFIX, count=count)
        return [
            DeadLetter(
                id=_text(entry_id),
                entry=_text(fields[b"entry"]),
                group=_text(fields[b"group"]),
                reason=_text(fields[b"reason"]),
                deliveries=int(fields[b"deliveries"]),
                payload=_text(fields[b"payload"]),
            )
            for entry_id, fields in records
        ]

    def _load(
        self,
        stream: str,
        group: str,
        records: list[tuple[Any, dict]],
        columns: Sequence[str] | None,
        expect: pa.Schema | None,
        deliveries: dict[str, int],
    ) -> list[Entry]:
        if not records:
            return []
        # A whole-payload read fetches the first segment (usually the only one) with the layout,
        # in one round trip; a column read looks at the layout first, to fetch only what it needs.
        first = (
            [segment_key(_text(fields[b"payload"]), "0").encode() for _, fields in records] if columns is None else []
        )
        pipe = self.client.pipeline(transaction=False)
        for _, fields in records:
            pipe.hgetall(fields[b"payload"])
        for key in first:
            pipe.get(key)
        replies = pipe.execute()
        layouts = replies[: len(records)]
        segments = dict(zip(first, replies[len(records) :], strict=True))
        wanted: dict[bytes, None] = {}
        for layout in layouts:
            try:
                names = list(columns) if columns is not None else stored_names(layout)
                wanted.update(dict.fromkeys(key for key in needed_segments(layout, names) if key not in segments))
            except PayloadError:
                pass  # reported per entry below
        if wanted:
            pipe = self.client.pipeline(transaction=False)
            for key in wanted:
                pipe.get(key)
            segments.update(zip(wanted, pipe.execute(), strict=True))
        entries, orphans = [], []
        for (entry_id, fields), layout in zip(records, layouts, strict=True):
            entry_id = _text(entry_id)
            if not layout:
                # Acknowledged by its previous owner after we claimed it, or purged: either
                # way it must not be used again.
                orphans.append(entry_id)
                continue
            try:
                names = list(columns) if columns is not None else stored_names(layout)
                table = decode_columns(layout, segments, names, expect)
                meta = msgpack.unpackb(fields[b"meta"], raw=False) if b"meta" in fields else {}
            except (PayloadError, ValueError, msgpack.UnpackException) as exc:
                self.dead_letter(stream, group, entry_id, f"bad payload: {exc}", deliveries.get(entry_id, 1))
                continue
            entries.append(Entry(id=entry_id, table=table, meta=meta))
        if orphans:
            log.warning("store: %d entries of %s had no payload (already acknowledged); skipped", len(orphans), stream)
            stream_key = self.key(stream)
            self.client.xack(stream_key, group, *orphans)
            self._delivered.drop(stream_key, group, orphans)
        return entries

    # -- stream upkeep -------------------------------------------------------------------------

    def pending(self, stream: str, group: str) -> int:
        """Entries of ``group`` delivered but not yet acknowledged."""
        return int(self.client.xpending(self.key(stream), group)["pending"])

    def length(self, stream: str) -> int:
        """Entries in ``stream`` (acknowledged ones included, until ``trim``)."""
        return int(self.client.xlen(self.key(stream)))

    def inflight(self, stream: str) -> tuple[int, int]:
        """(entries, bytes) put on ``stream`` and not yet acknowledged, advanced or dead-lettered."""
        entries, size = self.client.hmget(self.key(stream) + INFLIGHT_SUFFIX, [b"entries", b"bytes"])
        return int(entries or 0), int(size or 0)

    def trim(self, stream: str) -> int:
        """Drop the entries every consumer group of ``stream`` is done with; returns how many.

        An entry stays while any group has it pending or has not yet been delivered it; a
        stream without groups is left as it is.
        """
        stream_key = self.key(stream)
        if not self.client.exists(stream_key):
            return 0
        groups = self.client.xinfo_groups(stream_key)
        if not groups:
            return 0
        cutoffs = []
        for info in groups:
            # The pending count may drop to 0 between the two calls (an ack in between): then XPENDING has no min.
            summary = self.client.xpending(stream_key, info["name"]) if int(info["pending"]) else {"min": None}
            if summary["min"] is not None:
                cutoffs.append(_parse_id(summary["min"]))
            else:
                ms, seq = _parse_id(info["last-delivered-id"])
                cutoffs.append((ms, seq + 1))
        ms, seq = min(cutoffs)
        return int(self.client.xtrim(stream_key, minid=f"{ms}-{seq}", approximate=False))

    def release_retired(self) -> int:
        """Delete the payloads that ``ack`` retired (``retention='checkpoint'``); returns how many."""
        retired = self.key("retired")
        released = 0
        while keys := self.client.spop(retired, 1000):
            released += int(self._free(args=keys))
        return released

    # -- control values ------------------------------------------------------------------------

    def set_value(self, name: str, obj: Any, ttl_s: float | None = None) -> None:
        """Store a msgpack-encodable ``obj`` under ``name``, expiring after ``ttl_s`` if given."""
        px = int(ttl_s * 1000) if ttl_s is not None else None
        self.client.set(self.key(name), msgpack.packb(obj, use_bin_type=True), px=px)

    def get_value(self, name: str, default: Any = None) -> Any:
        """The object stored under ``name``, or ``default`` if there is none."""
        raw = self.client.get(self.key(name))
        return default if raw is None else msgpack.unpackb(raw, raw=False)

    def delete_value(self, name: str) -> None:
        """Remove the object stored under ``name`` (no-op if there is none)."""
        self.client.delete(self.key(name))

    def incr(self, name: str, by: int = 1) -> int:
        """Atomically add ``by`` to the counter ``name`` (0 if absent); returns the new value."""
        return int(self.client.incrby(self.key(name), by))

    # -- the run's keys ------------------------------------------------------------------------

    def run_keys(self) -> list[str]:
        """Every key of this run (SCAN, never KEYS)."""
        pattern = _escape_glob(self.prefix) + "*"
        return [_text(key) for key in self.client.scan_iter(match=pattern, count=1000)]

    def purge(self) -> int:
        """Delete every key of this run; returns how many were deleted."""
        deleted = 0
        batch: list[str] = []
        for key in self.run_keys():
            batch.append(key)
            if len(batch) == 1000:
                deleted += int(self.client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(self.client.unlink(*batch))
        return deleted


def _reconnects(client: redis.Redis) -> int:
    """Calls ``client`` has retried after a dropped connection so far (0 without a ``ReconnectRetry``)."""
    return getattr(client.get_retry(), "reconnects", 0)


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _stream_records(reply: Any) -> list[tuple[Any, dict]]:
    """The (id, fields) records of a one-stream XREADGROUP reply."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: records}, which redis-py may wrap in one more list
        (records,) = reply.values()
        if records and isinstance(records[0], list):
            records = records[0]
        return [record for record in records if record[0] is not None]
    return [record for _, records in reply for record in records if record[0] is not None]
