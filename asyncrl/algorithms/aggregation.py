"""How per-token losses of a micro-batch become one scalar (DAPO and Dr. GRPO differ here).

Each function takes ``per_token`` and ``mask`` ``[B, L]`` (1 on trained tokens) and
``max_response_len`` (used by ``seq_mean_token_sum_norm`` only). Across gradient accumulation
each micro-batch then weighs the same: the engine divides by the number of micro-batches.
"""

from __future__ import annotations

from torch import Tensor


def token_mean(per_token: Tensor, mask: Tensor, max_response_len: int = 0) -> Tensor:
    """Sum over masked tokens / their count: every token weighs the same (DAPO's token-level loss).

    Long responses are not down-weighted, so a long wrong answer is penalised per token like a
    short one. No masked token gives 0.
    """
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def seq_mean_token_sum(per_token: Tensor, mask: Tensor, max_response_len: int = 0) -> Tensor:
    """Each response's token sum, averaged over the responses that have a token."""
    has_tokens = (mask.sum(dim=-1) > 0).to(per_token.dtype)
    per_sequence = (per_token * mask).sum(dim=-1)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def seq_mean_token_mean(per_token: Tensor, mask: Tensor, max_response_len: int = 0) -> Tensor:
    """Each response's token mean, averaged over the responses that have a token (the original GRPO)."""
    tokens = mask.sum(dim=-1)
    has_tokens = (tokens > 0).to(per_token.dtype)
    per_sequence = (per_token * mask).sum(dim=-1) / tokens.clamp(min=1.0)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, max_response_len: int = 0) -> Tensor:
    """Sum over masked tokens / (``B * max_response_len``): Dr. GRPO's constant normaliser.

    The divisor depends on neither the responses' lengths nor how many tokens are masked, so
    no response's tokens are up- or down-weighted by its length. ``B`` counts every row of the
    micro-batch; the trainer's micro-batches all have ``trainer.micro_batch_size`` rows, so the
    normaliser is the same constant for the whole run.
    """
    if max_response_len < 1:
        raise ValueError(f"seq_mean_token_sum_norm needs max_response_len >= 1, got {max_response_len}")
    return (per_token * mask).sum() / (mask.shape[0] * max_response_len)
