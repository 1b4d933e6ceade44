"""Writing a payload segment and the command that publishes it in one round trip, without copies.

redis-py packs every argument of a command into one contiguous buffer before sending it (the
hiredis packer always does), so a stock ``SET`` of a 1 MB Arrow batch copies it once more
after the encode has already copied it into one buffer. Here the ``SET`` is framed by hand
(RESP is a length header, the bytes, CRLF), so the segment's parts (``storage.codec.Segment``:
views of the table's own column buffers) go to the socket one after another as they are, and the
following command rides in the same write: one round trip, no copy of the batch in this process.
"""

from __future__ import annotations

from typing import Any

import redis

from storage.codec import Segment

_CRLF = b"\r\n"
_JOIN_BELOW = 64 << 10  # parts this small are joined before sending: a copy is cheaper than a syscall


def set_then(client: redis.Redis, key: str, segment: Segment, *command: Any) -> Any:
    """``SET key <segment>`` then ``command`` (if any), sent together; returns the last raw reply.

    Both replies are read before either error is raised, so the connection is never left with
    an unread reply; an error of the ``SET`` (out of memory, say) is raised first. A dropped
    connection is retried as the client's own commands are (the ``SET`` is idempotent; the
    command must be safe to repeat as a pipeline retry would repeat it).
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        return connection.retry.call_with_retry(
            lambda: _send_and_read(connection, key.encode(), segment, command),
            lambda _error: connection.disconnect(),
        )
    finally:
        pool.release(connection)


def set_then_many(client: redis.Redis, writes: list[tuple[str, Segment, tuple]]) -> list[Any]:
    """``set_then`` for each ``(key, segment, command)``, all of them in one write and one round trip; returns each
    command's raw reply, in order. Every reply is read before the first error is raised; retried as ``set_then``."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        return connection.retry.call_with_retry(
            lambda: _send_and_read_many(connection, writes),
            lambda _error: connection.disconnect(),
        )
    finally:
        pool.release(connection)


def _send_and_read(connection: Any, key: bytes, segment: Segment, command: tuple) -> Any:
    return _send_and_read_many(connection, [(key, segment, command)])[0]


def _send_and_read_many(connection: Any, writes: list[tuple[str | bytes, Segment, tuple]]) -> list[Any]:
    packed: list = []
    for key, segment, command in writes:
        key = key.encode() if isinstance(key, str) else key
        packed += [b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(key), key, segment.nbytes), *segment.parts, _CRLF]
        if command:
            packed += connection.pack_command(*command)
    connection.send_packed_command(_coalesced(packed))
    replies = []
    for _key, _segment, command in writes:
        for _ in range(2 if command else 1):
            try:
                replies.append(connection.read_response())
            except redis.exceptions.ResponseError as error:
                replies.append(error)
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
    step = iter(replies)  # each write's last reply: its command's, or the SET's without one
    return [next(step) if not command else (next(step), next(step))[1] for _key, _segment, command in writes]


def _coalesced(parts: list) -> list:
    """``parts`` with each run of small ones joined: redis-py sends each item with a ``sendall`` of its own, and each
    one gives up the GIL and waits to take it back (up to a switch interval while another thread computes). Large
    parts (column buffers of a big batch) still go out as they are, uncopied."""
    chunks: list = []
    run: list = []
    for part in parts:
        if (part.nbytes if isinstance(part, memoryview) else len(part)) >= _JOIN_BELOW:
            if run:
                chunks.append(b"".join(run))
                run = []
            chunks.append(part)
        else:
            run.append(part)
    if run:
        chunks.append(b"".join(run))
    return chunks
