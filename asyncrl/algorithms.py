"""RL objectives on plain tensors: GRPO advantages, the PPO clipped surrogate, token log-probs.

Pure torch, no DeepSpeed and no model: the trainer calls these on its micro-batches and the
unit tests call them on hand-made tensors. Shapes: ``B`` samples, ``L`` positions (prompt and
response, right-padded), ``V`` vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages: ``(r - mean_group) / (std_group + eps)``.

    ``rewards`` and ``group_index`` are ``[B]``; samples with the same ``group_index`` value are
    the responses to one prompt (values need not be contiguous or start at 0). The standard
    deviation is the sample one (Bessel-corrected, as ``torch.std``), so a group's advantages have
    unit std. A group whose rewards are all equal (a single sample included) carries no signal
    and gets exactly 0 rather than rounding noise divided by ``eps``.
    """
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_index must both be [B], got {tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    _, group = torch.unique(group_index, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0

    def per_group(values: Tensor, reduce: str) -> Tensor:
        out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, group, values, reduce=reduce, include_self=False)

    count = per_group(torch.ones_like(rewards), "sum")
    mean = per_group(rewards, "sum") / count
    centered = rewards - mean[group]
    variance = per_group(centered.square(), "sum") / (count - 1).clamp(min=1)
    advantages = centered / (variance.sqrt()[group] + eps)
    all_equal = per_group(rewards, "amax") == per_group(rewards, "amin")
    return torch.where(all_equal[group], torch.zeros_like(advantages), advantages)


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
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - behavior_logprobs
    # Masked positions (padding, prompt) may hold arbitrary log-probs; zero them before exp so
    # an overflow there cannot turn into inf * 0 = nan.
    ratio = torch.exp(log_ratio * mask)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    num_tokens = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        clip_active = (clipped < unclipped).to(mask.dtype)
        metrics = {
            "clip_fraction": float((clip_active * mask).sum() / num_tokens),
            "ratio_mean": float((ratio * mask).sum() / num_tokens),
            "approx_kl": float((-log_ratio * mask).sum() / num_tokens),
        }
    return loss, metrics


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
