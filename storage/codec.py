"""Arrow IPC payloads made of column segments.

A payload is a small Redis hash plus one string key per segment. A segment is an Arrow IPC
stream holding some of the batch's columns: ``put`` writes the batch as one segment (one IPC
message is the cheapest to encode and decode, and a plain string value is what Redis reads off
the socket without an extra copy), and every ``advance`` that adds columns (a reward, reference
log-probs) writes them as a segment of their own, so the existing bytes are never rewritten.

The hash holds:

- ``columns``: the column names in the order they were put and appended, one per line (a
  column listed there is what "ready" means to a stage waiting for it);
- ``seg:<segment key>``: the names of the columns that segment holds, one per line (a reader
  fetches only the segments of the columns it asks for; freeing the payload deletes them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pyarrow as pa

ORDER_FIELD = b"columns"
SEGMENT_PREFIX = b"seg:"
SEPARATOR = "\n"


class PayloadError(ValueError):
    """A payload that cannot be decoded, or that lacks or mistypes a column a reader asked for."""


def segment_key(payload_key: str, segment: str) -> str:
    return f"{payload_key}:s:{segment}"


class IpcEncoder:
    """Writes Arrow IPC streams into a reused buffer, one per thread.

    A fresh output buffer per batch costs more than the encoding itself: the allocator hands
    large blocks back to the OS on free, so each new one page-faults in again. The returned view
    is valid until the same thread's next ``encode`` (the caller sends it before encoding again).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def encode(self, table: pa.Table) -> memoryview:
        scratch = getattr(self._local, "scratch", bytearray())
        while True:
            sink = pa.FixedSizeBufferWriter(pa.py_buffer(scratch))
            try:
                with pa.ipc.new_stream(sink, table.schema) as writer:
                    writer.write_table(table)
                self._local.scratch = scratch
                return memoryview(scratch)[: sink.tell()]
            except (pa.ArrowInvalid, OSError, ValueError):
                # Too small for this batch: size it exactly, with room for the next ones.
                counter = pa.MockOutputStream()
                with pa.ipc.new_stream(counter, table.schema) as writer:
                    writer.write_table(table)
                if counter.size() <= len(scratch):
                    raise
                scratch = bytearray(2 * counter.size())


def segment_field(table: pa.Table, key: str) -> tuple[bytes, bytes]:
    """The hash field saying that ``table``'s columns live in the segment stored at ``key``."""
    for name in table.column_names:
        if not name or SEPARATOR in name:
            raise ValueError(f"column names must be non-empty and single-line, got {name!r}")
    if len(set(table.column_names)) != table.num_columns:
        raise ValueError(f"column names must be unique, got {table.column_names}")
    return SEGMENT_PREFIX + key.encode(), joined(table.column_names)


def joined(names: Sequence[str]) -> bytes:
    return SEPARATOR.join(names).encode()


def stored_names(layout: Mapping[bytes, bytes]) -> list[str]:
    """Column names of a payload, in the order they were put and appended."""
    order = layout.get(ORDER_FIELD)
    if order is None:
        raise PayloadError("the payload has no column list")
    return order.decode().split(SEPARATOR)


def column_segments(layout: Mapping[bytes, bytes]) -> dict[str, bytes]:
    """``{column: key of the segment holding it}`` from a payload's hash."""
    found: dict[str, bytes] = {}
    for field, names in layout.items():
        if field.startswith(SEGMENT_PREFIX):
            key = field[len(SEGMENT_PREFIX) :]
            found.update(dict.fromkeys(names.decode().split(SEPARATOR), key))
    return found


def needed_segments(layout: Mapping[bytes, bytes], names: Sequence[str]) -> list[bytes]:
    """The keys of the segments holding ``names``; ``PayloadError`` names a column the payload lacks."""
    where = column_segments(layout)
    keys: dict[bytes, None] = {}
    for name in names:
        if name not in where:
            raise PayloadError(f"the payload has no column {name!r}")
        keys[where[name]] = None
    return list(keys)


def decode_columns(
    layout: Mapping[bytes, bytes],
    segments: Mapping[bytes, bytes | None],
    names: Sequence[str],
    expect: pa.Schema | None = None,
) -> pa.Table:
    """The table of columns ``names`` from a payload's ``layout`` (its hash) and segment bytes.

    Raises ``PayloadError`` naming the column when one is missing, its segment is gone, is not
    valid Arrow IPC or does not hold it, the row counts disagree, or (with ``expect``) its type
    differs.
    """
    keys = needed_segments(layout, names)
    where = column_segments(layout)
    decoded = {key: _read_segment(segments.get(key), key) for key in keys}
    if len(keys) == 1 and decoded[keys[0]].schema.names == list(names):
        table = decoded[keys[0]]  # the usual case: one segment, all of it
        _check_types(table.schema, expect)
        return table
    arrays, fields = [], []
    for name in names:
        segment = decoded[where[name]]
        if name not in segment.schema.names:
            raise PayloadError(f"column {name!r} is not in its segment (which holds {segment.schema.names})")
        column = segment.column(name)
        if arrays and len(column) != len(arrays[0]):
            raise PayloadError(f"column {name!r} has {len(column)} rows, column {names[0]!r} has {len(arrays[0])}")
        arrays.append(column)
        fields.append(segment.schema.field(name))
    schema = pa.schema(fields)
    _check_types(schema, expect)
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_segment(data: bytes | None, key: bytes) -> pa.Table:
    name = key.decode(errors="replace").rpartition(":payload:")[2]
    if data is None:
        raise PayloadError(f"segment {name} is missing")
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise PayloadError(f"segment {name} is not valid Arrow IPC: {exc}") from exc


def _check_types(schema: pa.Schema, expect: pa.Schema | None) -> None:
    if expect is None:
        return
    for field in schema:
        if field.name in expect.names and field.type != expect.field(field.name).type:
            raise PayloadError(f"column {field.name!r} has type {field.type}, expected {expect.field(field.name).type}")
