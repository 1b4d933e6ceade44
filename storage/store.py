"""The transfer store: Redis Streams carry control, Arrow IPC carries payloads (DESIGN §4).

A stage appends record batches to a stream with ``put``; consumers of a stage share a consumer
group, ``read`` the batches that no one else got, ``ack`` them once used (which frees the
payload), and ``claim_stale`` takes over what a dead consumer read but never acknowledged.

Every key of a run is ``asyncrl:{<run_id>}:<name>``: the braces are a Redis Cluster hash tag,
so all keys of a run live in one slot and the MULTI/EXEC pipelines below stay valid on a
cluster. Every call is bounded by the client's socket timeout; a blocking read is shortened
so that it always returns before that timeout fires.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgpack
import pyarrow as pa
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

KEY_PREFIX = "asyncrl"

# A blocking XREADGROUP is answered by the server only when the block ends, so the block must
# end this long before the client's socket timeout, or a quiet stream reads as a dead server.
_BLOCK_MARGIN_MS = 1000


class StoreError(RuntimeError):
    """The store cannot be reached, started or used as asked."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: a record batch and the metadata it was put with."""

    id: str
    """Stream entry id, the handle for ``ack``."""
    table: pa.Table
    """The payload (only the asked-for columns when ``read(columns=...)``)."""
    meta: dict
    """The ``meta`` dict given to ``put``."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal lost its brackets in hostname
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for ``url`` whose every call (connect, send, read) is bounded by ``timeout_s``.

    Pings once, so an unreachable or misconfigured store fails here, within about ``timeout_s``,
    with a ``StoreError`` naming the address (password hidden) and the reason.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a dropped connection (a server that closed an idle client);
        # none on a timeout, so a silent server costs one timeout, not several.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        decode_responses=False,
    )
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        client.close()
        reason = str(exc) or type(exc).__name__
        raise StoreError(f"cannot reach the store at {redact_url(url)}: {reason}") from exc
    return client


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _escape_glob(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _encode_table(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _decode_table(data: bytes, columns: list[str] | None) -> pa.Table:
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    return table.select(columns) if columns is not None else table


class TrajectoryStore:
    """Streams of Arrow record batches for one run, read through consumer groups.

    ``client`` should come from ``connect`` (bounded timeouts, bytes responses); ``timeout_s``
    is its socket timeout, used to keep blocking reads shorter than it.
    """

    def __init__(self, client: redis.Redis, run_id: str, timeout_s: float) -> None:
        if not run_id or any(char in run_id for char in "{}"):
            raise ValueError(f"run_id must be non-empty and free of braces, got {run_id!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.client = client
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.prefix = f"{KEY_PREFIX}:{{{run_id}}}:"
        timeout_ms = int(timeout_s * 1000)
        self.max_block_ms = max(1, timeout_ms - min(_BLOCK_MARGIN_MS, timeout_ms // 2))

    def key(self, name: str) -> str:
        """The full Redis key of ``name`` in this run."""
        return self.prefix + name

    # -- streams -------------------------------------------------------------------------------

    def put(self, stream: str, table: pa.Table, meta: dict | None = None) -> str:
        """Append ``table`` to ``stream``; returns the entry id.

        The payload key and the stream entry are written in one MULTI/EXEC, so a reader never
        sees an entry whose payload is not there yet.
        """
        payload_key = self.key(f"payload:{uuid.uuid4().hex}")
        fields = {
            "payload": payload_key,
            "rows": table.num_rows,
            "meta": msgpack.packb(meta or {}, use_bin_type=True),
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.set(payload_key, memoryview(_encode_table(table)))
        pipe.xadd(self.key(stream), fields)
        _, entry_id = pipe.execute()
        return _text(entry_id)

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
        columns: list[str] | None = None,
    ) -> list[Entry]:
        """Up to ``count`` entries of ``stream`` never delivered to ``group`` before.

        Waits at most ``block_ms`` (capped below the socket timeout; <= 0 does not wait) for the
        first entry; returns ``[]`` if none came. The entries stay pending for ``consumer``
        until ``ack``. ``columns`` selects the payload columns to return.
        """
        block = min(block_ms, self.max_block_ms) if block_ms > 0 else None
        reply = self.client.xreadgroup(group, consumer, {self.key(stream): ">"}, count=count, block=block)
        records = _stream_records(reply)
        return self._entries(stream, group, records, columns)

    def ack(self, stream: str, group: str, ids: Iterable[str]) -> int:
        """Acknowledge entries of ``group`` and delete their payloads; returns how many were pending.

        The payload is freed on ack, so a stream feeds one consumer group.
        """
        ids = list(ids)
        if not ids:
            return 0
        stream_key = self.key(stream)
        lookup = self.client.pipeline(transaction=False)
        for entry_id in ids:
            lookup.xrange(stream_key, min=entry_id, max=entry_id)
        payload_keys = [found[0][1][b"payload"] for found in lookup.execute() if found]
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(stream_key, group, *ids)
        if payload_keys:
            pipe.delete(*payload_keys)
        return int(pipe.execute()[0])

    def claim_stale(
        self,
        stream: str,
        group: str,
        consumer: str,
        min_idle_ms: int,
        count: int = 10,
        columns: list[str] | None = None,
    ) -> list[Entry]:
        """Take over up to ``count`` entries that another consumer read but has not acknowledged
        for ``min_idle_ms``; they become pending for ``consumer``."""
        stream_key = self.key(stream)
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
        return self._entries(stream, group, records, columns)

    def pending(self, stream: str, group: str) -> int:
        """Entries of ``group`` delivered but not yet acknowledged."""
        return int(self.client.xpending(self.key(stream), group)["pending"])

    def length(self, stream: str) -> int:
        """Entries in ``stream`` (acknowledged ones included)."""
        return int(self.client.xlen(self.key(stream)))

    def _entries(
        self, stream: str, group: str, records: list[tuple[Any, dict]], columns: list[str] | None
    ) -> list[Entry]:
        if not records:
            return []
        pipe = self.client.pipeline(transaction=False)
        for _, fields in records:
            pipe.get(fields[b"payload"])
        payloads = pipe.execute()
        entries, orphans = [], []
        for (entry_id, fields), payload in zip(records, payloads, strict=True):
            entry_id = _text(entry_id)
            if payload is None:
                # Acknowledged by its previous owner after we claimed it, or purged: either
                # way it must not be used again.
                orphans.append(entry_id)
                continue
            meta = msgpack.unpackb(fields[b"meta"], raw=False) if b"meta" in fields else {}
            entries.append(Entry(id=entry_id, table=_decode_table(payload, columns), meta=meta))
        if orphans:
            log.warning("store: %d entries of %s had no payload (already acknowledged); skipped", len(orphans), stream)
            self.client.xack(self.key(stream), group, *orphans)
        return entries

    # -- control values ------------------------------------------------------------------------

    def set_value(self, name: str, obj: Any, ttl_s: float | None = None) -> None:
        """Store a msgpack-encodable ``obj`` under ``name``, expiring after ``ttl_s`` if given."""
        px = int(ttl_s * 1000) if ttl_s is not None else None
        self.client.set(self.key(name), msgpack.packb(obj, use_bin_type=True), px=px)

    def get_value(self, name: str, default: Any = None) -> Any:
        """The object stored under ``name``, or ``default`` if there is none."""
        raw = self.client.get(self.key(name))
        return default if raw is None else msgpack.unpackb(raw, raw=False)

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
