"""Arrow IPC payloads made of column segments.

A payload is one Redis hash. A segment is an Arrow IPC stream holding some of its columns:
``put`` writes all the batch's columns as one segment (one IPC message is the cheapest to
encode and decode), and every ``advance`` that adds columns (a reward, reference log-probs)
writes them as a segment of their own, so the existing bytes are never rewritten. Fields:

- ``s:<segment>``: the segment's IPC bytes;
- ``r:<column>``: the segment holding that column (a reader fetches only what it asks for; the
  field's presence is also what "column ready" means to a stage waiting for it);
- ``columns``: the column names in the order they were put and appended, one per line.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pyarrow as pa

SEGMENT_PREFIX = b"s:"
READY_PREFIX = b"r:"
ORDER_FIELD = b"columns"
SEPARATOR = "\n"


class PayloadError(ValueError):
    """A payload that cannot be decoded, or that lacks or mistypes a column a reader asked for."""


def ready_field(column: str) -> bytes:
    return READY_PREFIX + column.encode()


class IpcEncoder:
    """Writes Arrow IPC streams into one reused buffer.

    A fresh output buffer per batch costs more than the encoding itself: the allocator hands
    large blocks back to the OS on free, so each new one page-faults in again. The returned view
    is valid until the next ``encode`` (the caller sends it before encoding the next batch).
    """

    def __init__(self) -> None:
        self._scratch = bytearray()
        self._lock = threading.Lock()

    def encode(self, table: pa.Table) -> memoryview:
        with self._lock:
            while True:
                sink = pa.FixedSizeBufferWriter(pa.py_buffer(self._scratch))
                try:
                    with pa.ipc.new_stream(sink, table.schema) as writer:
                        writer.write_table(table)
                    return memoryview(self._scratch)[: sink.tell()]
                except (pa.ArrowInvalid, OSError, ValueError):
                    # Too small for this batch: size it exactly, with room for the next ones.
                    counter = pa.MockOutputStream()
                    with pa.ipc.new_stream(counter, table.schema) as writer:
                        writer.write_table(table)
                    if counter.size() <= len(self._scratch):
                        raise
                    self._scratch = bytearray(2 * counter.size())


def segment_fields(table: pa.Table, segment: str, encoder: IpcEncoder) -> dict[bytes, bytes | memoryview]:
    """The payload fields that store ``table``'s columns as segment ``segment`` (without ``columns``)."""
    for name in table.column_names:
        if not name or SEPARATOR in name:
            raise ValueError(f"column names must be non-empty and single-line, got {name!r}")
    if len(set(table.column_names)) != table.num_columns:
        raise ValueError(f"column names must be unique, got {table.column_names}")
    segment_field = SEGMENT_PREFIX + segment.encode()
    fields: dict[bytes, bytes | memoryview] = {segment_field: encoder.encode(table)}
    fields.update({ready_field(name): segment_field for name in table.column_names})
    return fields


def column_order(names: Sequence[str]) -> bytes:
    return SEPARATOR.join(names).encode()


def stored_names(fields: Mapping[bytes, bytes | None]) -> list[str]:
    """Column names of a payload, in the order they were put and appended."""
    order = fields.get(ORDER_FIELD)
    if order is None:
        raise PayloadError("the payload has no column list")
    return order.decode().split(SEPARATOR)


def decode_columns(
    fields: Mapping[bytes, bytes | None],
    names: Sequence[str],
    expect: pa.Schema | None = None,
) -> pa.Table:
    """The table of columns ``names`` from a payload's ``fields`` (its ``r:`` and ``s:`` fields).

    Raises ``PayloadError`` naming the column when one is missing, its segment is not valid
    Arrow IPC or does not hold it, the row counts disagree, or (with ``expect``) its type differs.
    """
    segments: dict[bytes, pa.Table] = {}
    whole = _whole_segment(fields, names)
    if whole is not None:
        segments[whole] = _read_segment(fields, whole, names[0])
        table = segments[whole]
        if table.schema.names == list(names):
            _check_types(table.schema, expect)
            return table
    arrays, schema_fields = [], []
    for name in names:
        segment_field = fields.get(ready_field(name))
        if segment_field is None:
            raise PayloadError(f"the payload has no column {name!r}")
        if segment_field not in segments:
            segments[segment_field] = _read_segment(fields, segment_field, name)
        segment = segments[segment_field]
        if name not in segment.schema.names:
            raise PayloadError(f"column {name!r} is not in its segment (which holds {segment.schema.names})")
        field = segment.schema.field(name)
        column = segment.column(name)
        if arrays and len(column) != len(arrays[0]):
            raise PayloadError(f"column {name!r} has {len(column)} rows, column {names[0]!r} has {len(arrays[0])}")
        arrays.append(column)
        schema_fields.append(field)
    schema = pa.schema(schema_fields)
    _check_types(schema, expect)
    return pa.Table.from_arrays(arrays, schema=schema)


def _whole_segment(fields: Mapping[bytes, bytes | None], names: Sequence[str]) -> bytes | None:
    """The one segment holding every column of ``names``, if there is one (the usual case)."""
    found = {fields.get(ready_field(name)) for name in names}
    return found.pop() if len(found) == 1 and None not in found else None


def _read_segment(fields: Mapping[bytes, bytes | None], segment_field: bytes, column: str) -> pa.Table:
    data = fields.get(segment_field)
    if data is None:
        raise PayloadError(f"the payload has no segment {segment_field.decode(errors='replace')!r}")
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise PayloadError(f"the segment holding column {column!r} is not valid Arrow IPC: {exc}") from exc


def _check_types(schema: pa.Schema, expect: pa.Schema | None) -> None:
    if expect is None:
        return
    for field in schema:
        if field.name in expect.names and field.type != expect.field(field.name).type:
            raise PayloadError(f"column {field.name!r} has type {field.type}, expected {expect.field(field.name).type}")
