"""RLOO advantages: each reward minus the mean of the other rewards of its group (Ahmadian et al., 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.groups import group_stats


def rloo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """``r_i - (sum_group - r_i) / (n - 1)``, the leave-one-out baseline.

    The baseline excludes the sample itself, so it is independent of that sample's action and
    the estimate is unbiased; it equals ``n / (n - 1) * (r_i - mean_group)``. A group of one
    sample has no other sample to form a baseline and gets 0, as does a group whose rewards
    are all equal. ``rewards`` and ``group_index`` are ``[B]`` as in ``grpo_advantages``.
    """
    stats = group_stats(rewards, group_index)
    others = (stats.count - 1).clamp(min=1)
    baseline = (stats.total[stats.index] - stats.rewards) / others[stats.index]
    advantages = stats.rewards - baseline
    no_signal = stats.all_equal | (stats.count < 2)
    return torch.where(no_signal[stats.index], torch.zeros_like(advantages), advantages)
