"""Connecting to the store's Redis: bounded timeouts, clear errors, passwords kept out of messages."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


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


def connect(url: str, timeout_s: float, **tls: str) -> redis.Redis:
    """A client for ``url`` whose every call (connect, send, read) is bounded by ``timeout_s``.

    ``url`` is ``redis://[user:password@]host:port/db``, ``rediss://`` for TLS (``tls`` may
    then name ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``), or ``unix:///path?password=...``. Pings
    once, so an unreachable or misconfigured store fails here, within about ``timeout_s``, with
    a ``StoreError`` naming the address (password hidden) and the reason.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
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
    return client
