"""A remote reward model over HTTP (``reward.fn=http``): one JSON POST per batch, a timeout, retries with back-off.

The protocol. The client POSTs, with ``Content-Type: application/json``::

    {"prompts": ["...", ...], "responses": ["...", ...], "metadata": [{"answer": "..."}, ...]}

three lists of equal length, at most ``reward.http.batch_size`` long, and expects status 200 and::

    {"rewards": [0.7, ...]}

one entry per sample, in order. An entry is a number or an object of named numbers (components,
read as in ``asyncrl.rewards.interface``: its ``total``, else the sum).

A connection error, a timeout, or a status 408, 429 or 5xx is retried up to ``max_retries`` times,
after waiting ``backoff_s``, then twice that, and so on; after the last one the call raises
``RewardModelUnavailable``. Any other status, a body that is not that JSON, or a list of the wrong
length raises at once: asking again would not change the answer. A raise fails the batch's samples
at the reward fault boundary and the run goes on. ``timeout_s`` bounds the connect and each socket
read, not a whole request; ``reward.timeout_s`` bounds the whole call, retries included, so keep it
above ``(max_retries + 1) * timeout_s`` plus the back-off waits.

Only the standard library is used (urllib); proxies come from the usual environment variables.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError

if TYPE_CHECKING:
    from asyncrl.config import HttpRewardConfig

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses that say "not now" rather than "no": the request is sent again."""


class RewardModelUnavailable(ConnectionError):
    """The reward server gave no usable answer after every retry."""


class HttpRewardModel:
    """A batched reward that asks a reward server (see the module docstring for the protocol)."""

    batched = True

    def __init__(
        self, url: str, *, batch_size: int = 32, timeout_s: float = 10.0, max_retries: int = 2, backoff_s: float = 0.5
    ) -> None:
        self.url = url
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    @classmethod
    def from_config(cls, cfg: HttpRewardConfig) -> HttpRewardModel:
        return cls(
            cfg.url,
            batch_size=cfg.batch_size,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
        )

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[float | dict[str, float]]:
        rewards = []
        for start in range(0, len(responses), self.batch_size):
            end = start + self.batch_size
            payload = {
                "prompts": list(prompts[start:end]),
                "responses": list(responses[start:end]),
                "metadata": [dict(meta) for meta in metadata[start:end]],
            }
            rewards.extend(self._post(payload, len(payload["responses"])))
        return rewards

    def _post(self, payload: dict, expected: int) -> list:
        """The ``rewards`` list of one request, retried on transient errors with exponential back-off."""
        body = json.dumps(payload).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return _rewards(self._send(body), expected)
            except HTTPError as err:
                err.close()
                if err.code not in RETRY_STATUSES:
                    raise
                error: Exception = err
            except (URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut short
                error = err
            if attempt + 1 < attempts:
                delay = self.backoff_s * 2**attempt
                log.debug(
                    "reward model %s: %r; retry %d/%d in %.2fs", self.url, error, attempt + 1, attempts - 1, delay
                )
                time.sleep(delay)
        raise RewardModelUnavailable(
            f"reward model {self.url} failed {attempts} attempt(s); last: {error!r}"
        ) from error

    def _send(self, body: bytes) -> bytes:
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return response.read()


def _rewards(body: bytes, expected: int) -> list:
    answer = json.loads(body)
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list):
        raise ValueError(f"the reward model must answer a JSON object with a 'rewards' list, got {body[:200]!r}")
    if len(rewards) != expected:
        raise ValueError(f"the reward model returned {len(rewards)} rewards for {expected} samples")
    return rewards
