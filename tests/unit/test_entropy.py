"""mean_token_entropy: the per-step entropy metric, from the logits the trainer already has."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.policy import mean_token_entropy


def test_uniform_and_one_hot_distributions_over_the_masked_tokens_only() -> None:
    vocab = 8
    logits = torch.zeros(1, 4, vocab)  # position t predicts token t + 1
    logits[0, 1] = torch.tensor([100.0] + [0.0] * (vocab - 1))  # near one-hot: entropy ~0, predicts token 2
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # tokens 1 and 2 are trained: predicted at positions 0 and 1
    assert mean_token_entropy(logits, mask) == pytest.approx(math.log(vocab) / 2, rel=1e-5)
    only_uniform = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert mean_token_entropy(logits, only_uniform) == pytest.approx(math.log(vocab), rel=1e-5)


def test_temperature_scales_the_logits_first() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[0.0, 1.0]])
    p = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)  # logits / 2
    expected = float(-(p * p.log()).sum())
    assert mean_token_entropy(logits, mask, temperature=2.0) == pytest.approx(expected, rel=1e-6)
    assert mean_token_entropy(logits, mask, temperature=2.0) > mean_token_entropy(logits, mask, temperature=1.0)


def test_no_trained_token_gives_zero() -> None:
    assert mean_token_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3)) == 0.0


def test_a_token_cap_takes_an_even_stride_over_every_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11) * 3
    mask = torch.ones(3, 6)
    mask[:, 0] = 0.0  # 5 trained tokens per row, 15 in all
    full = mean_token_entropy(logits, mask)
    assert mean_token_entropy(logits, mask, max_tokens=15) == pytest.approx(full, rel=1e-6)
    # 15 tokens capped at 5: stride 3 over the row-major (row, position) pairs, i.e. tokens 0, 3, ..., 12.
    probs = torch.softmax(logits[:, :-1].reshape(15, 11), dim=-1)[::3]
    expected = float(-(probs * probs.log()).sum(dim=-1).mean())
    assert mean_token_entropy(logits, mask, max_tokens=5) == pytest.approx(expected, rel=1e-5)
    assert mean_token_entropy(logits, mask, max_tokens=5) != pytest.approx(full, rel=1e-3)
