"""Dr. GRPO advantages: the group mean as baseline, no division by the group's std (Liu et al., 2025).

Dividing by the std up-weights prompts that are almost always solved or almost always failed
(small std); Dr. GRPO drops it. Its other half is the loss normaliser: GRPO divides each
response's token sum by that response's length, which biases toward long wrong answers; Dr.
GRPO divides by a constant instead. Here that is the aggregation ``seq_mean_token_sum_norm``
(``asyncrl.algorithms.aggregation``: the token sum over ``B * rollout.max_new_tokens``), chosen
separately with ``trainer.loss_agg`` so each piece can be tried alone; the paper's setting is
``trainer.advantage=dr_grpo trainer.loss_agg=seq_mean_token_sum_norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.groups import group_stats


def dr_grpo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """``r - mean_group`` per sample; exactly 0 for a group whose rewards are all equal.

    ``rewards`` and ``group_index`` are ``[B]`` as in ``grpo_advantages``. The mean of equal
    float rewards can differ from them in the last bit, hence the explicit zero.
    """
    stats = group_stats(rewards, group_index)
    advantages = stats.rewards - (stats.total / stats.count)[stats.index]
    return torch.where(stats.all_equal[stats.index], torch.zeros_like(advantages), advantages)
