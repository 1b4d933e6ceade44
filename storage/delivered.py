"""The entries a store client has handed to its caller, so that entries delivered in a lost reply are found.

The server makes an entry pending for a consumer when it runs the XREADGROUP (or XAUTOCLAIM) that returns it. If
the connection drops before the reply arrives (a store server killed, its AOF keeping that delivery, and
restarted), the client's retry gets the entries after them: the lost ones stay pending for a consumer that is
alive and never heard of them, so no reclaim takes them and the stage that waits for them stalls.
``Delivered`` keeps the ids handed out and not yet acknowledged; after a call that had to reconnect, the
consumer's pending entries outside them are the ones a lost reply delivered.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

PRUNE_AT = 4096
"""Ids held for one consumer at which its set is cut down to what the server still has pending for it: an entry
acknowledged through another client (a rollout worker's writer acks the prompts its reader took) is never
dropped here otherwise."""


class Delivered:
    """Ids per (stream key, group, consumer) handed to the caller and not yet known acknowledged. ``lock`` is held
    by a delivering call from its request until its ids are added, so that a recovery or a prune in another thread
    never mistakes them for lost or gone."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._ids: dict[tuple[str, str], dict[str, set[str]]] = {}

    def add(self, stream_key: str, group: str, consumer: str, ids: Iterable[str]) -> bool:
        """Note ``ids`` handed to ``consumer``; True once its set has ``PRUNE_AT`` ids (time for ``keep``)."""
        held = self._ids.setdefault((stream_key, group), {}).setdefault(consumer, set())
        held.update(ids)
        return len(held) >= PRUNE_AT

    def drop(self, stream_key: str, group: str, ids: Iterable[str]) -> None:
        """Forget acknowledged ids, whichever consumer held them."""
        ids = set(ids)
        for held in list(self._ids.get((stream_key, group), {}).values()):
            held.difference_update(ids)

    def keep(self, stream_key: str, group: str, consumer: str, pending: Iterable[str]) -> None:
        """Keep only the ids of ``consumer`` the server has ``pending`` for it (all of them, under ``lock``)."""
        held = self._ids.get((stream_key, group), {}).get(consumer)
        if held is not None:
            held.intersection_update(pending)

    def unseen(self, stream_key: str, group: str, consumer: str, pending: Iterable[str]) -> list[str]:
        """Those of ``pending`` (the server's pending ids of ``consumer``) never handed to it: a lost reply's."""
        held = self._ids.get((stream_key, group), {}).get(consumer, set())
        return [entry_id for entry_id in pending if entry_id not in held]

    def count(self, stream_key: str, group: str, consumer: str) -> int:
        return len(self._ids.get((stream_key, group), {}).get(consumer, ()))
