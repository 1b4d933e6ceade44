"""PPO-clip that drops the tokens whose ratio to the behaviour policy leaves a band (IcePop-style masking).

A token whose probability under the trainer differs a lot from the sampler's (a stale sample,
or numerical mismatch between the inference engine and the trainer) gives a gradient that is
mostly noise; clipping only zeroes the gradient on one side of the ratio, masking drops the
token on both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algorithms.loss import (
    LossConfig,
    LossInputs,
    Surrogate,
    behavior_metrics,
    clipped_surrogate,
    log_ratio_and_ratio,
    reduce_loss,
    surrogate_metrics,
    token_average,
)


def ratio_mask(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """``ppo_clip``'s per-token loss, zeroed where the ratio is outside ``[ratio_band_low, ratio_band_high]``.

    A dropped token adds nothing to the loss but still counts in the aggregation's normaliser,
    so the remaining tokens' gradients keep their scale however many are dropped.
    ``masked_fraction`` is the share of response tokens dropped; ``clip_fraction`` counts the
    kept tokens whose clipped term is active.
    """
    mask = inputs.token_mask()
    log_ratio, ratio = log_ratio_and_ratio(inputs.logprobs, inputs.behavior_logprobs, mask)
    surrogate = clipped_surrogate(ratio, inputs.token_advantages(), cfg)
    in_band = (ratio >= cfg.ratio_band_low) & (ratio <= cfg.ratio_band_high)
    kept = Surrogate(
        per_token=surrogate.per_token * in_band.to(mask.dtype),
        clip_active=surrogate.clip_active & in_band,
        dual_active=None if surrogate.dual_active is None else surrogate.dual_active & in_band,
    )
    metrics = {**surrogate_metrics(kept, mask), **behavior_metrics(log_ratio, ratio, mask)}
    with torch.no_grad():
        metrics["masked_fraction"] = token_average((~in_band).to(mask.dtype), mask)
    return reduce_loss(kept.per_token, inputs, cfg, metrics)
