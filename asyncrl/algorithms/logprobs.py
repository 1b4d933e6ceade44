"""Token log-probs from logits, aligned with the token they score."""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under ``logits / temperature``, at the token's own position.

    ``logits[:, t]`` predicts token ``t + 1``, so the result's position ``t`` holds
    ``log_softmax(logits[:, t - 1] / temperature)[input_ids[:, t]]``; position 0 has no
    prediction and is 0, as is every position where ``response_mask`` is 0. Computed in
    float32 as ``gathered logit - logsumexp`` (the same value as a log_softmax gather without
    materialising a ``[B, L, V]`` log-prob tensor). Returns ``[B, L]`` float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits[:, :-1].float() / temperature
    next_tokens = input_ids[:, 1:].unsqueeze(-1)
    token_logits = torch.gather(scaled, -1, next_tokens).squeeze(-1)
    shifted = token_logits - torch.logsumexp(scaled, dim=-1)
    out = torch.nn.functional.pad(shifted, (1, 0))
    return out * response_mask.to(out.dtype)
