"""Truncated importance sampling: an off-policy policy gradient with capped weights, no trust region.

The gradient is ``-min(ratio, tis_cap) * A * grad(log p)`` with ``ratio`` to the behaviour
policy: the truncation bounds the variance a token sampled far off-policy can add, at the cost
of a small bias. There is no clip, so nothing stops one step from moving the policy far; keep
the learning rate and the staleness small. For PPO-clip with a truncated behaviour weight
(Yao et al.'s TIS for sampler/trainer mismatch) use ``decoupled_ppo``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.loss import (
    LossConfig,
    LossInputs,
    behavior_metrics,
    log_ratio_and_ratio,
    reduce_loss,
    token_average,
    truncate,
)


def truncated_is(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """Per token ``-A * w * exp(logprobs - sg(logprobs))`` with ``w = sg(min(ratio, tis_cap))``.

    The factor ``exp(logprobs - sg(logprobs))`` is 1 in value and has gradient
    ``grad(log p)``, so the loss value is ``-A * w`` and its gradient ``-A * w * grad(log p)``.
    ``tis_cap = 0`` keeps the weights whole (plain importance sampling). ``clip_fraction`` is
    the share of tokens whose weight was truncated.
    """
    mask = inputs.token_mask()
    log_ratio, ratio = log_ratio_and_ratio(inputs.logprobs, inputs.behavior_logprobs, mask)
    weight, truncated = truncate(ratio.detach(), cfg.tis_cap)
    score = torch.exp(inputs.logprobs - inputs.logprobs.detach())
    per_token = -inputs.token_advantages() * weight * score

    metrics = behavior_metrics(log_ratio, ratio, mask)
    with torch.no_grad():
        metrics["clip_fraction"] = token_average(truncated.to(mask.dtype), mask)
    return reduce_loss(per_token, inputs, cfg, metrics)
