"""PPO-clip against the behaviour policy: the ratio of the current to the sampling log-probs, clipped."""

from __future__ import annotations

from torch import Tensor

from asyncrl.algorithms.loss import (
    LossConfig,
    LossInputs,
    behavior_metrics,
    clipped_surrogate,
    log_ratio_and_ratio,
    reduce_loss,
    surrogate_metrics,
)


def ppo_clip(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate with ``ratio = exp(logprobs - behavior_logprobs)`` per token.

    The behaviour policy is also the trust region's anchor, so with stale samples the clip
    binds on staleness as much as on this step's update (``decoupled_ppo`` separates the two).
    Clip range ``[1 - clip_eps_low, 1 + clip_eps_high]``, optional dual clip, then KL and
    aggregation as in ``loss.reduce_loss``. With the defaults (symmetric 0.2, token mean, no
    KL) this is the loss the trainer always had.
    """
    mask = inputs.token_mask()
    log_ratio, ratio = log_ratio_and_ratio(inputs.logprobs, inputs.behavior_logprobs, mask)
    surrogate = clipped_surrogate(ratio, inputs.token_advantages(), cfg)
    metrics = {**surrogate_metrics(surrogate, mask), **behavior_metrics(log_ratio, ratio, mask)}
    return reduce_loss(surrogate.per_token, inputs, cfg, metrics)


def ppo_clip_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate against the behaviour policy that sampled the tokens.

    ``logprobs`` (with grad), ``behavior_logprobs`` and ``mask`` are ``[B, L]``; ``advantages``
    is ``[B]`` (one per sample, broadcast over its response tokens) or ``[B, L]``. Per token,
    ``ratio = exp(logprobs - behavior_logprobs)`` and
    ``loss = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)``.

    Aggregation: the token-level mean over the masked tokens of this micro-batch (sum over all
    masked tokens / their count), so every response token weighs the same within a micro-batch
    and long responses are not down-weighted (DAPO's token-mean). Across gradient accumulation
    each micro-batch then weighs the same (the trainer's engine divides by the number of
    micro-batches). A micro-batch with no masked token gives a zero loss.

    Metrics (floats over masked tokens): ``clip_fraction`` is the share of tokens whose
    clipped term is the active one (their gradient is zero), ``ratio_mean`` the mean ratio,
    ``approx_kl`` the mean of ``behavior_logprobs - logprobs``.
    """
    inputs = LossInputs(logprobs=logprobs, behavior_logprobs=behavior_logprobs, advantages=advantages, mask=mask)
    return ppo_clip(inputs, LossConfig(clip_eps_low=clip_eps, clip_eps_high=clip_eps))
