"""Connecting to the store's Redis: bounded timeouts, clear errors, passwords kept out of messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 1.0


class StoreError(RuntimeError):
    """The store cannot be reached, started or used as asked."""


def redact_url(url: str) -> str:
    """``url`` with its password (in the address or a ``password=`` query) replaced by ``***``."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        hidden = urlencode([(key, "***" if key == "password" else value) for key, value in query], safe="*")
        url = url.partition("?")[0] + "?" + hidden
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal lost its brackets in hostname
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class ReconnectRetry(Retry):
    """Retry a call whose connection dropped (``ConnectionError``, the server ``LOADING`` its AOF included) with
    exponential backoff from ``RECONNECT_FIRST_S`` to ``RECONNECT_MAX_S``, until ``budget_s`` has passed since
    the first failure; then the last error is raised. A restarted store server is reached again this way.

    Bounded by time, not by a count: redis-py nests the connect's retry inside the command's, and a deadline
    shared by both (the outer one started first) keeps the whole call within about ``budget_s``. A wrong password
    (``AuthenticationError``) is never retried. ``reconnects`` counts the retries, for callers that must know
    whether a reply may have been lost (``TrajectoryStore.read``).
    """

    def __init__(self, budget_s: float) -> None:
        super().__init__(NoBackoff(), -1, supported_errors=(redis.exceptions.ConnectionError,))
        self.budget_s = budget_s
        self.reconnects = 0

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        deadline, failures = None, 0
        while True:
            try:
                return do()
            except redis.exceptions.ConnectionError as error:
                if isinstance(error, redis.exceptions.AuthenticationError) or (
                    is_retryable is not None and not is_retryable(error)
                ):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                now = time.monotonic()
                deadline = now + self.budget_s if deadline is None else deadline
                if now >= deadline:
                    raise
                self.reconnects += 1
                time.sleep(min(RECONNECT_FIRST_S * 2 ** (failures - 1), RECONNECT_MAX_S, deadline - now))

    def __deepcopy__(self, memo: dict) -> ReconnectRetry:
        return self  # one per client, shared by its connections: ``reconnects`` counts them all


def connect(url: str, timeout_s: float, reconnect_s: float = 0.0, **tls: str) -> redis.Redis:
    """A client for ``url`` whose every call (connect, send, read) is bounded by ``timeout_s``.

    ``url`` is ``redis://[user:password@]host:port/db``, ``rediss://`` for TLS (``tls`` may
    then name ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``), or ``unix:///path?password=...``. Pings
    once, so an unreachable or misconfigured store fails here, within about ``timeout_s``, with
    a ``StoreError`` naming the address (password hidden) and the reason. After that ping, with
    ``reconnect_s`` > 0, a call whose connection drops keeps reconnecting for up to ``reconnect_s``
    (``ReconnectRetry``: a store server being restarted); a call repeated this way must be safe to repeat.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if reconnect_s < 0:
        raise ValueError(f"reconnect_s must be >= 0, got {reconnect_s}")
    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a dropped connection (a server that closed an idle client);
        # none on a timeout, so a silent server costs one timeout, not several.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        decode_responses=False,
        **{key: value for key, value in tls.items() if value},
    )
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        client.close()
        reason = str(exc) or type(exc).__name__
        raise StoreError(f"cannot reach the store at {redact_url(url)}: {reason}") from exc
    if reconnect_s > 0:
        client.set_retry(ReconnectRetry(reconnect_s))
    return client
