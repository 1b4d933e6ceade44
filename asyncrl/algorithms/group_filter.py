"""DAPO's dynamic-sampling filter: drop the groups whose rewards are all equal.

Such a group has zero advantage under every group-baseline estimator, so it moves no weight;
kept, it would still take batch slots and, under token-level aggregation, dilute the gradient
of the groups that do carry signal. The trainer drops it and samples another prompt instead.
"""

from __future__ import annotations

from torch import Tensor

from asyncrl.algorithms.groups import group_stats


def group_keep_mask(rewards: Tensor, group_index: Tensor) -> Tensor:
    """``[B]`` bool, the same for every sample of a group: True where the group's rewards differ.

    A group of a single sample counts as all equal (dropped). ``rewards`` and ``group_index``
    are ``[B]`` as in ``grpo_advantages``.
    """
    stats = group_stats(rewards, group_index)
    return ~stats.all_equal[stats.index]
