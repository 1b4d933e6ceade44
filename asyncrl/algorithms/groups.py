"""Per-group statistics shared by the group-baseline advantage estimators and the group filter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Statistics of ``rewards`` per group; the ``[G]`` tensors are indexed by ``index``."""

    rewards: Tensor
    """``[B]`` floating-point rewards."""
    index: Tensor
    """``[B]`` dense group number in ``0 .. G-1`` of each sample."""
    count: Tensor
    """``[G]`` samples per group."""
    total: Tensor
    """``[G]`` sum of the group's rewards."""
    all_equal: Tensor
    """``[G]`` True where every reward of the group is the same (a single sample included)."""

    @property
    def num_groups(self) -> int:
        return int(self.count.numel())

    def reduce(self, values: Tensor, reduce: str) -> Tensor:
        """``values [B]`` reduced (``sum``, ``amax``, ...) per group to ``[G]``."""
        return _per_group(values, self.index, self.num_groups, reduce)


def _per_group(values: Tensor, index: Tensor, num_groups: int, reduce: str) -> Tensor:
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index, values, reduce=reduce, include_self=False)


def check_rewards(rewards: Tensor, group_index: Tensor) -> Tensor:
    """``rewards`` as floats after checking both tensors are ``[B]``."""
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_index must both be [B], got {tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    return rewards if rewards.is_floating_point() else rewards.to(torch.float32)


def group_stats(rewards: Tensor, group_index: Tensor) -> GroupStats:
    """Count, sum and all-equal flag per group; ``group_index`` values need not be contiguous or sorted."""
    rewards = check_rewards(rewards, group_index)
    _, index = torch.unique(group_index, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    count = _per_group(torch.ones_like(rewards), index, num_groups, "sum")
    total = _per_group(rewards, index, num_groups, "sum")
    all_equal = _per_group(rewards, index, num_groups, "amax") == _per_group(rewards, index, num_groups, "amin")
    return GroupStats(rewards, index, count, total, all_equal)
