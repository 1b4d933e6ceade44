"""Reward functions and the fault boundary around them.

A reward function is a plain callable ``fn(prompt, response, **metadata) -> float``; it is named
in the config as ``package.module:function``. A function that raises or returns a non-finite
value marks only that sample failed; the run goes on.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable

log = logging.getLogger(__name__)

RewardFn = Callable[..., float]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ONLY_NUMBER = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*\.?\s*$")


def arithmetic_reward(prompt: str, response: str, *, answer: str, **_: object) -> float:
    """1.0 when the last number in the response equals the answer, plus 0.2 when the response is only a number."""
    numbers = _NUMBER.findall(response)
    correct = bool(numbers) and float(numbers[-1]) == float(answer)
    concise = bool(_ONLY_NUMBER.match(response))
    return float(correct) + 0.2 * float(concise)


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``package.module:function``; a clear error names what is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward.fn: cannot import module {module_name!r}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.fn: {module_name!r} has no callable {attr!r}")
    return fn


def score(fn: RewardFn, prompt: str, response: str, metadata: dict) -> tuple[float, bool]:
    """(reward, failed). The fault boundary: an exception or a non-finite value fails only this sample."""
    try:
        value = float(fn(prompt, response, **metadata))
    except Exception as err:  # noqa: BLE001 - a user's reward code may raise anything
        log.warning("reward function failed on one sample: %r", err)
        return 0.0, True
    if not math.isfinite(value):
        log.warning("reward function returned %r; sample marked failed", value)
        return 0.0, True
    return value, False
