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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

ORDER_FIELD = b"columns"
SEGMENT_PREFIX = b"seg:"
SEPARATOR = "\n"


class PayloadError(ValueError):
    """A payload that cannot be decoded, or that lacks or mistypes a column a reader asked for."""


def segment_key(payload_key: str, segment: str) -> str:
    return f"{payload_key}:s:{segment}"


# Pieces below this size are gathered into one buffer (one send instead of many tiny ones);
# larger ones, the column data, go to the socket straight from the table's memory.
_GATHER_BELOW = 64 * 1024


@dataclass(frozen=True, slots=True)
class Segment:
    """An Arrow IPC stream as the pieces the writer produced, not copied into one buffer."""

    parts: list[memoryview | bytearray]
    """In order: framing and metadata gathered together, column buffers as views of the table."""
    nbytes: int


class _GatherSink:
    """A write-only file for ``pa.PythonFile``: Arrow hands it the IPC framing as small bytes and
    each column buffer as a ``pa.Buffer`` over the table's own memory, which it keeps by reference."""

    __slots__ = ("closed", "nbytes", "parts", "small")

    def __init__(self) -> None:
        self.parts: list[memoryview | bytearray] = []
        self.small = bytearray()
        self.nbytes = 0
        self.closed = False

    def write(self, data: bytes | pa.Buffer) -> int:
        view = memoryview(data)
        self.nbytes += view.nbytes
        if view.nbytes < _GATHER_BELOW:
            self.small += view
        else:
            if self.small:
                self.parts.append(self.small)
                self.small = bytearray()
            self.parts.append(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def encode_segment(table: pa.Table) -> Segment:
    """``table`` as one Arrow IPC stream, without copying its column data.

    The segment refers to the table's buffers, so it stays valid as long as it is held; sending
    its parts one after another costs no copy of the batch (a contiguous encode costs one, and
    packing a contiguous argument into a command another).
    """
    sink = _GatherSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table)
    if sink.small:
        sink.parts.append(sink.small)
    return Segment(sink.parts, sink.nbytes)


def segment_field(table: pa.Table, key: str) -> tuple[bytes, bytes]:
    """The hash field saying that ``table``'s columns live in the segment stored at ``key``."""
    names = table.schema.names
    for name in names:
        if not name or SEPARATOR in name:
            raise ValueError(f"column names must be non-empty and single-line, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"column names must be unique, got {names}")
    return SEGMENT_PREFIX + key.encode(), joined(names)


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
    # The usual case, a payload of exactly the expected schema, is one comparison in Arrow (a read decodes each entry).
    if expect is None or schema.equals(expect):
        return
    expected = {field.name: field.type for field in expect}
    for field in schema:
        if field.name in expected and field.type != expected[field.name]:
            raise PayloadError(f"column {field.name!r} has type {field.type}, expected {expected[field.name]}")
