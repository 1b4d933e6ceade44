"""Decoupled PPO (AReaL, Fu et al., 2025): the trust region around the proximal policy, not the sampler.

With asynchronous rollouts the behaviour policy can be several versions old, so clipping
against it (``ppo_clip``) mixes two things: how far this update moves the policy and how stale
the sample is. Decoupled PPO clips the ratio to the proximal policy (the weights at the start
of this step, whose log-probs the trainer recomputes without grad before the step's update)
and corrects for the sampler with the importance weight ``proximal / behaviour``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.loss import (
    LossConfig,
    LossInputs,
    behavior_metrics,
    clipped_surrogate,
    log_ratio_and_ratio,
    reduce_loss,
    surrogate_metrics,
    token_average,
    truncate,
)


def decoupled_ppo(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """``w * clipped_surrogate(exp(logprobs - proximal))`` per token, ``w = exp(proximal - behaviour)``.

    ``w`` carries no gradient and is truncated at ``tis_cap`` (0 keeps it whole), which bounds
    the variance a very stale or mismatched token can add. ``clip_fraction`` counts the clip
    against the proximal policy; ``proximal_ratio_mean`` is that ratio's mean, ``is_weight_mean``
    the mean weight after truncation and ``is_truncated_fraction`` the share truncated.
    ``ratio_mean`` and ``approx_kl`` compare with the behaviour policy, as for every loss.
    """
    if inputs.proximal_logprobs is None:
        raise ValueError("decoupled_ppo needs proximal_logprobs (the trainer recomputes them before the update)")
    mask = inputs.token_mask()
    _, proximal_ratio = log_ratio_and_ratio(inputs.logprobs, inputs.proximal_logprobs, mask)
    surrogate = clipped_surrogate(proximal_ratio, inputs.token_advantages(), cfg)
    _, raw_weight = log_ratio_and_ratio(inputs.proximal_logprobs.detach(), inputs.behavior_logprobs, mask)
    weight, truncated = truncate(raw_weight, cfg.tis_cap)

    log_ratio, ratio = log_ratio_and_ratio(inputs.logprobs, inputs.behavior_logprobs, mask)
    metrics = {**surrogate_metrics(surrogate, mask), **behavior_metrics(log_ratio, ratio, mask)}
    with torch.no_grad():
        metrics["proximal_ratio_mean"] = token_average(proximal_ratio, mask)
        metrics["is_weight_mean"] = token_average(weight, mask)
        metrics["is_truncated_fraction"] = token_average(truncated.to(mask.dtype), mask)
    return reduce_loss(surrogate.per_token * weight, inputs, cfg, metrics)
