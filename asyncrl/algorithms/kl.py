"""Per-token estimators of KL(policy || reference) from the sampled tokens' log-probs (Schulman, 2020).

With ``d = ref_logprobs - logprobs`` at a token sampled from the policy: ``k1 = -d`` is unbiased
but can be negative; ``k2 = d**2 / 2`` is low-variance but biased; ``k3 = exp(d) - d - 1`` is
unbiased and never negative. Masked positions are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _log_ratio(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    # Padding may hold arbitrary log-probs; zeroing before exp keeps an overflow there from
    # turning into inf * 0 = nan.
    return (ref_logprobs - logprobs) * mask


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``logprobs - ref_logprobs``."""
    return -_log_ratio(logprobs, ref_logprobs, mask)


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``(logprobs - ref_logprobs) ** 2 / 2``."""
    return _log_ratio(logprobs, ref_logprobs, mask).square() / 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``exp(ref - logprobs) - (ref - logprobs) - 1``."""
    log_ratio = _log_ratio(logprobs, ref_logprobs, mask)
    return torch.exp(log_ratio) - log_ratio - 1.0
