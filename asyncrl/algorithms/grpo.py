"""GRPO advantages: each reward standardised within its group (DeepSeekMath)."""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.groups import group_stats


def grpo_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages: ``(r - mean_group) / (std_group + eps)``.

    ``rewards`` and ``group_index`` are ``[B]``; samples with the same ``group_index`` value are
    the responses to one prompt (values need not be contiguous or start at 0). The standard
    deviation is the sample one (Bessel-corrected, as ``torch.std``), so a group's advantages have
    unit std. A group whose rewards are all equal (a single sample included) carries no signal
    and gets exactly 0 rather than rounding noise divided by ``eps``.
    """
    stats = group_stats(rewards, group_index)
    mean = stats.total / stats.count
    centered = stats.rewards - mean[stats.index]
    variance = stats.reduce(centered.square(), "sum") / (stats.count - 1).clamp(min=1)
    advantages = centered / (variance.sqrt()[stats.index] + eps)
    return torch.where(stats.all_equal[stats.index], torch.zeros_like(advantages), advantages)
