"""REINFORCE++ advantages: rewards standardised over the whole batch, with no group baseline (Hu, 2025).

Normalising by the global batch instead of each prompt's group keeps prompts with a low reward
spread from being amplified (GRPO divides by a per-group std). The trainer therefore scores a
step's rows together: the estimator is listed in ``registry.BATCH_SCOPED_ADVANTAGES``, and
``trainers.batch.GroupScorer`` holds every group of the step until the batch is complete.

The paper folds a per-token KL penalty to the reference into the reward; here that KL is a loss
term instead (``trainer.kl_coef``), as for every estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.groups import check_rewards


def reinforce_pp_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """``(r - mean_batch) / (std_batch + eps)`` over all ``B`` samples; ``group_index`` is not used.

    It is accepted so every estimator has the same signature. The std is Bessel-corrected, as in
    ``grpo_advantages``; a batch of one sample, or one whose rewards are all equal, gets 0.
    """
    rewards = check_rewards(rewards, group_index)
    if rewards.numel() < 2 or bool(rewards.max() == rewards.min()):
        return torch.zeros_like(rewards)
    centered = rewards - rewards.mean()
    return centered / (rewards.std() + eps)
