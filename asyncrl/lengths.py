"""Per-prompt response-length budgets: ``rollout.length_dist`` (a registry by name).

A budget is the ``max_tokens`` of every sample of one prompt. ``fixed`` gives every prompt
``rollout.max_new_tokens``. ``lognormal`` draws ``round(length_median * exp(length_sigma * z))``
with ``z`` standard normal from a generator seeded by ``(run.seed, prompt index)``, clipped to
``[1, rollout.max_new_tokens]``: most prompts stop early and a long tail runs to the cap, the
shape of reasoning-model response lengths. The same prompt gets the same budget on every worker
and in every run with the same seed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from asyncrl.data import prompt_index

if TYPE_CHECKING:  # config validates length_dist against this registry, so it is imported lazily there
    from asyncrl.config import RolloutConfig


def _fixed(rc: RolloutConfig, seed: int, index: int) -> int:
    return rc.max_new_tokens


def _lognormal(rc: RolloutConfig, seed: int, index: int) -> int:
    z = float(np.random.default_rng((seed, index)).standard_normal())
    return max(1, min(rc.max_new_tokens, round(rc.length_median * math.exp(rc.length_sigma * z))))


LENGTH_DISTS: dict[str, Callable[[RolloutConfig, int, int], int]] = {"fixed": _fixed, "lognormal": _lognormal}


def length_budget(rc: RolloutConfig, seed: int, prompt_id: str) -> int:
    """``max_tokens`` for every sample of ``prompt_id`` (ids like ``p17``; others hash to an index)."""
    try:
        index = prompt_index(prompt_id)
    except ValueError:
        index = zlib.crc32(prompt_id.encode())
    return LENGTH_DISTS[rc.length_dist](rc, seed, index)
