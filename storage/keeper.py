"""Keeping the embedded redis-server up for the length of a run.

``ServerKeeper`` watches the server's process from a thread of its own. A server that exits while the run
needs it is started again on the same dir, port, password and Unix socket when it keeps an AOF
(``store.appendonly``): it reloads what it had acknowledged, and the clients, which retry a dropped
connection for ``store.reconnect_s`` (``storage.client.ReconnectRetry``), carry on. Without an AOF its data
is gone, and so is the run: the keeper records a ``StoreLost`` that names why, as it does once
``store.max_restarts`` restarts are used up.

The restarted server's death signal is tied to the keeper's thread, which therefore lives until ``stop``
has stopped the server.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from storage.client import StoreError
from storage.redis_server import EmbeddedRedis

log = logging.getLogger(__name__)

POLL_S = 0.1


class StoreLost(StoreError):
    """The run's embedded store server died and was not (or could not be) brought back."""


class ServerKeeper:
    """Restarts ``server`` (an ``EmbeddedRedis`` already started) whenever it exits, at most ``max_restarts``
    times, if it keeps an AOF; ``failure`` is the ``StoreLost`` that ends the run otherwise. Use it as
    ``ServerKeeper(...).start()`` and ``stop()`` (or ``with``)."""

    def __init__(self, server: EmbeddedRedis, max_restarts: int, start_timeout_s: float = 10.0) -> None:
        self.server = server
        self.max_restarts = max_restarts
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        """Restarts that brought the server back so far (counted once it answers PING, not when it is spawned:
        clients may reconnect to it a moment before)."""
        self.failure: StoreLost | None = None
        """Set when the server died for good: why the run cannot go on."""
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and ``stop`` never overlap
        self._thread = threading.Thread(target=self._watch, name="redis-keeper", daemon=True)

    def start(self) -> ServerKeeper:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (a restart under way finishes first), then the watch."""
        with self._lock:
            self._stopping.set()
            self.server.stop()
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerKeeper:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _watch(self) -> None:
        """Waits on: the server's process exiting (polled every ``POLL_S``) or ``stop``. Ends when the server is
        lost (``failure``) or stopped; until ``stop`` it then idles, so a server it started keeps its parent."""
        while not self._stopping.wait(POLL_S):
            with self._lock:
                if self._stopping.is_set() or self.failure is not None:
                    continue
                code = self.server.exit_code()
                if code is not None:
                    self._server_exited(code)

    def _server_exited(self, code: int) -> None:
        pid, how = self.server.pid, _exit_text(code)
        where = f"the embedded redis-server (pid {pid}, {self.server.dir}) {how}"
        if not self.server.appendonly:
            self._lost(
                f"{where} and ran with store.appendonly=false: the prompts and trajectories it held are gone, so the "
                "run cannot go on. Run with store.appendonly=true to have a killed server restarted on its AOF"
            )
            return
        if self.restarts >= self.max_restarts:
            self._lost(f"{where} again; store.max_restarts={self.max_restarts} restarts are used up")
            return
        log.warning("store: %s; restarting it on its AOF (restart %d of store.max_restarts=%d)",
                    where, self.restarts + 1, self.max_restarts)  # fmt: skip
        tic = time.monotonic()
        try:
            self.server.restart(self.start_timeout_s)
        except StoreError as err:
            self._lost(f"{where} and could not be restarted: {err}")
            return
        self.restarts += 1
        log.warning("store: the embedded redis-server is back in pid %d after %.2fs, its AOF reloaded",
                    self.server.pid, time.monotonic() - tic)  # fmt: skip

    def _lost(self, reason: str) -> None:
        self.failure = StoreLost(reason)
        log.error("store: %s", reason)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
