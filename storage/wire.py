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


def _send_and_read(connection: Any, key: bytes, segment: Segment, command: tuple) -> Any:
    head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(key), key, segment.nbytes)
    then = connection.pack_command(*command) if command else []
    connection.send_packed_command([head, *segment.parts, _CRLF, *then])
    replies = []
    for _ in range(2 if command else 1):
        try:
            replies.append(connection.read_response())
        except redis.exceptions.ResponseError as error:
            replies.append(error)
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
    return replies[-1]
