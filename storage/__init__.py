"""The transfer store: Redis Streams for control, Arrow IPC for payloads (DESIGN §4)."""

from storage.client import StoreError, connect, redact_url
from storage.codec import PayloadError
from storage.redis_server import EmbeddedRedis, find_server_bin
from storage.store import DeadLetter, Entry, Limits, StoreFull, TrajectoryStore

__all__ = [
    "DeadLetter",
    "EmbeddedRedis",
    "Entry",
    "Limits",
    "PayloadError",
    "StoreError",
    "StoreFull",
    "TrajectoryStore",
    "connect",
    "find_server_bin",
    "redact_url",
]
