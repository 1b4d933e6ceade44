"""The contract every policy loss follows, and the pieces the losses share.

A loss is ``fn(inputs: LossInputs, cfg: LossConfig) -> (loss, metrics)``: a scalar with grad,
and floats computed over the masked tokens. Every loss reports ``clip_fraction``,
``ratio_mean`` and ``approx_kl`` (the controller logs them); ``ratio_mean`` and ``approx_kl``
always compare the current policy with the behaviour policy that sampled the tokens, so the
curves mean the same under every loss, and ``clip_fraction`` is the share of tokens whose
gradient that loss's clip or truncation cut. A loss may add more keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.algorithms.registry import get_aggregation, get_kl_estimator


@dataclass(frozen=True, slots=True)
class LossInputs:
    """One micro-batch's tensors; every ``[B, L]`` tensor is aligned as ``sequence_logprobs``."""

    logprobs: Tensor
    """``[B, L]`` log-probs of the sampled tokens under the current weights, with grad."""
    behavior_logprobs: Tensor
    """``[B, L]`` log-probs the rollout engine sampled the tokens with."""
    advantages: Tensor
    """``[B]`` (one per sample, broadcast over its tokens) or ``[B, L]``."""
    mask: Tensor
    """``[B, L]`` 1 on the trained (response) tokens, 0 on prompt and padding."""
    proximal_logprobs: Tensor | None = None
    """``[B, L]`` log-probs under the weights at the start of the step, no grad (decoupled PPO)."""
    ref_logprobs: Tensor | None = None
    """``[B, L]`` log-probs under a frozen reference model; the KL term is added only when present."""

    def token_mask(self) -> Tensor:
        return self.mask.to(self.logprobs.dtype)

    def token_advantages(self) -> Tensor:
        """Advantages that broadcast against ``[B, L]``."""
        return self.advantages.unsqueeze(-1) if self.advantages.dim() == 1 else self.advantages


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    """Settings of the losses; the trainer builds it from ``cfg.trainer`` (see ``trainers.worker``)."""

    clip_eps_low: float = 0.2
    """The ratio is clipped below at ``1 - clip_eps_low``."""
    clip_eps_high: float = 0.2
    """The ratio is clipped above at ``1 + clip_eps_high`` (DAPO's clip-higher: larger than low)."""
    dual_clip: float = 0.0
    """PPO dual clip: with A < 0 the per-token loss is capped at ``dual_clip * |A|``; 0 is off."""
    loss_agg: str = "token_mean"
    """Name in ``registry.LOSS_AGGREGATIONS``."""
    max_response_len: int = 0
    """The longest response (``rollout.max_new_tokens``); the constant of ``seq_mean_token_sum_norm``."""
    tis_cap: float = 2.0
    """Importance weights are truncated at this value (``tis``, ``decoupled_ppo``); 0 keeps them whole."""
    ratio_band_low: float = 0.5
    """``ratio_mask`` drops tokens whose ratio to the behaviour policy is below this."""
    ratio_band_high: float = 2.0
    """``ratio_mask`` drops tokens whose ratio to the behaviour policy is above this."""
    kl_coef: float = 0.0
    """Weight of the per-token KL to the reference model; 0 is off."""
    kl_estimator: str = "k3"
    """Name in ``registry.KL_ESTIMATORS``."""


def token_average(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values`` over the masked tokens, as a float (0 when there is none)."""
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))


def log_ratio_and_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``logprobs - base_logprobs`` and its exp; the exp sees 0 at masked positions."""
    log_ratio = logprobs - base_logprobs
    # Masked positions (padding, prompt) may hold arbitrary log-probs; zero them before exp so
    # an overflow there cannot turn into inf * 0 = nan.
    return log_ratio, torch.exp(log_ratio * mask)


def truncate(weight: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """``weight`` capped at ``cap`` (``cap <= 0``: untouched), and the bool mask of what was capped."""
    if cap <= 0:
        return weight, torch.zeros_like(weight, dtype=torch.bool)
    truncated = weight > cap
    return torch.where(truncated, torch.full_like(weight, cap), weight), truncated


def behavior_metrics(log_ratio: Tensor, ratio: Tensor, mask: Tensor) -> dict[str, float]:
    """``ratio_mean`` and ``approx_kl`` (mean of ``behavior - current`` log-probs) against the behaviour policy."""
    with torch.no_grad():
        return {"ratio_mean": token_average(ratio, mask), "approx_kl": token_average(-log_ratio, mask)}


@dataclass(frozen=True, slots=True)
class Surrogate:
    per_token: Tensor
    """``[B, L]`` the negated clipped objective."""
    clip_active: Tensor
    """``[B, L]`` bool: the clipped term is the active one (its gradient is zero)."""
    dual_active: Tensor | None
    """``[B, L]`` bool: the dual-clip bound is active (its gradient is zero); None when off."""


def clipped_surrogate(ratio: Tensor, advantages: Tensor, cfg: LossConfig) -> Surrogate:
    """``-min(ratio * A, clip(ratio, 1 - low, 1 + high) * A)`` per token, then the optional dual clip.

    The min keeps the pessimistic term, so the clip binds only where it would otherwise reward
    moving further: above ``1 + high`` with A > 0 and below ``1 - low`` with A < 0. With A < 0 a
    very large ratio is unbounded in the plain objective; the dual clip caps that loss at
    ``dual_clip * |A|`` (Ye et al., 2020).
    """
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    clip_active = clipped < unclipped
    if cfg.dual_clip <= 0:
        return Surrogate(per_token, clip_active, None)
    bound = -cfg.dual_clip * advantages
    dual_active = (advantages < 0) & (per_token > bound)
    return Surrogate(torch.where(dual_active, bound.expand_as(per_token), per_token), clip_active, dual_active)


def surrogate_metrics(surrogate: Surrogate, mask: Tensor) -> dict[str, float]:
    with torch.no_grad():
        metrics = {"clip_fraction": token_average(surrogate.clip_active.to(mask.dtype), mask)}
        if surrogate.dual_active is not None:
            metrics["dual_clip_fraction"] = token_average(surrogate.dual_active.to(mask.dtype), mask)
    return metrics


def reduce_loss(
    per_token: Tensor, inputs: LossInputs, cfg: LossConfig, metrics: dict[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """Add ``kl_coef`` times the KL to the reference, then aggregate over the response tokens.

    The KL term needs ``inputs.ref_logprobs``, which the reference stage adds (``stages.reference``);
    the term is added only for a batch that carries them, and ``kl_ref`` is reported then.
    """
    mask = inputs.token_mask()
    if cfg.kl_coef > 0 and inputs.ref_logprobs is not None:
        kl = get_kl_estimator(cfg.kl_estimator)(inputs.logprobs, inputs.ref_logprobs, mask)
        per_token = per_token + cfg.kl_coef * kl
        with torch.no_grad():
            metrics["kl_ref"] = token_average(kl, mask)
    loss = get_aggregation(cfg.loss_agg)(per_token, mask, cfg.max_response_len)
    return loss, metrics
