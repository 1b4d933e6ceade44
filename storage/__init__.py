"""The transfer store: Redis Streams for control, Arrow IPC for payloads (DESIGN §4)."""

from storage.redis_server import EmbeddedRedis, find_server_bin
from storage.store import Entry, StoreError, TrajectoryStore, connect, redact_url

__all__ = ["EmbeddedRedis", "Entry", "StoreError", "TrajectoryStore", "connect", "find_server_bin", "redact_url"]
