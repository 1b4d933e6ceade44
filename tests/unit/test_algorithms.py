"""GRPO advantages, the PPO clipped surrogate and token log-prob alignment on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.algorithms import grpo_advantages, ppo_clip_loss, sequence_logprobs


def test_grpo_advantages_are_standardised_per_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 10.0])
    groups = torch.tensor([7, 7, 7, 7, 2, 2, 2])  # ids need not be contiguous or sorted

    advantages = grpo_advantages(rewards, groups)

    for group in (7, 2):
        in_group = advantages[groups == group]
        assert in_group.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert in_group.std().item() == pytest.approx(1.0, abs=1e-4)
    # order within a group is kept: the larger reward gets the larger advantage
    assert advantages[0] > advantages[1]
    assert advantages[6] > advantages[5] > advantages[4]


def test_grpo_advantages_of_equal_rewards_are_exactly_zero() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 42.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # group 2 has a single sample

    advantages = grpo_advantages(rewards, groups)

    assert torch.equal(advantages[:3], torch.zeros(3))
    assert advantages[5].item() == 0.0
    assert advantages[3] > 0 > advantages[4]


def test_ppo_clip_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 3)

    loss, metrics = ppo_clip_loss(logprobs, logprobs.detach().clone(), advantages, mask, clip_eps=0.2)

    # six tokens: three with advantage 2, three with -1
    assert loss.item() == pytest.approx(-(3 * 2.0 + 3 * -1.0) / 6)
    assert metrics == {"clip_fraction": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0}
    loss.backward()
    # d(-ratio * A)/d logprob = -A at ratio 1, divided by the token count
    expected = (-advantages / 6).unsqueeze(-1).expand(2, 3)
    assert torch.allclose(logprobs.grad, expected)


def test_ppo_clip_loss_gradient_is_zero_beyond_the_clip_band() -> None:
    behavior = torch.zeros(1, 4)
    # ratios 1.5 and 1.1 with A > 0; 0.5 and 0.9 with A < 0 (two separate samples)
    ratios = torch.tensor([[1.5, 1.1, 0.5, 0.9]])
    logprobs = ratios.log().clone().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])

    loss, metrics = ppo_clip_loss(logprobs, behavior, advantages, torch.ones(1, 4), clip_eps=0.2)
    loss.backward()

    assert logprobs.grad[0, 0].item() == 0.0  # 1.5 > 1.2 with A > 0: clipped
    assert logprobs.grad[0, 2].item() == 0.0  # 0.5 < 0.8 with A < 0: clipped
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.1 / 4)  # inside the band: -A * ratio / N
    assert logprobs.grad[0, 3].item() == pytest.approx(0.9 / 4)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    # pessimistic bound: the clipped tokens contribute their clipped value
    assert loss.item() == pytest.approx(-(1.2 + 1.1 - 0.8 - 0.9) / 4)


def test_ppo_clip_loss_does_not_clip_where_the_bound_is_not_active() -> None:
    # ratio 1.5 with A < 0 and 0.5 with A > 0: min() picks the unclipped term, gradient flows
    logprobs = torch.tensor([[1.5, 0.5]]).log().requires_grad_(True)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert metrics["clip_fraction"] == 0.0
    assert torch.allclose(logprobs.grad, torch.tensor([[1.5 / 2, -0.5 / 2]]))


def test_ppo_clip_loss_mask_excludes_padding() -> None:
    logprobs = torch.tensor([[-1.0, -1.0, 50.0, 80.0]], requires_grad=True)  # junk in the padding
    behavior = torch.tensor([[-1.0, -1.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])

    loss, metrics = ppo_clip_loss(logprobs, behavior, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss.backward()

    ratio = math.exp(0.1)  # inside the clip band
    assert loss.item() == pytest.approx(-(1.0 + ratio) / 2)
    assert torch.isfinite(logprobs.grad).all()
    assert torch.equal(logprobs.grad[0, 2:], torch.zeros(2))
    assert metrics["ratio_mean"] == pytest.approx((1.0 + ratio) / 2)
    assert metrics["approx_kl"] == pytest.approx(-0.05)
    assert metrics["clip_fraction"] == 0.0


def test_ppo_clip_loss_with_no_response_token_is_zero() -> None:
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), clip_eps=0.2)
    assert loss.item() == 0.0


def test_sequence_logprobs_aligns_each_token_with_its_own_position() -> None:
    vocab = 3
    input_ids = torch.tensor([[0, 2, 1, 0]])
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [9.0, 9.0, 9.0]]])
    response_mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # the last position is padding
    temperature = 0.5

    out = sequence_logprobs(logits, input_ids, response_mask, temperature)

    def log_softmax_at(row: list[float], token: int) -> float:
        scaled = [x / temperature for x in row]
        return scaled[token] - math.log(sum(math.exp(x) for x in scaled))

    # token 2 at position 1 is predicted by the logits at position 0, token 1 at 2 by those at 1
    expected = [0.0, log_softmax_at([1.0, 2.0, 3.0], 2), log_softmax_at([0.0] * vocab, 1), 0.0]
    assert out.shape == (1, 4)
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=5), st.floats(min_value=-100, max_value=100, width=32)),
        min_size=1,
        max_size=40,
    )
)
def test_grpo_advantages_sum_to_zero_in_every_group(samples: list[tuple[int, float]]) -> None:
    groups = torch.tensor([group for group, _ in samples])
    rewards = torch.tensor([reward for _, reward in samples], dtype=torch.float32)

    advantages = grpo_advantages(rewards, groups)

    assert torch.isfinite(advantages).all()
    for group in groups.unique():
        in_group = advantages[groups == group]
        assert abs(in_group.sum().item()) <= 1e-3 * len(in_group)
        # standardised: no |advantage| exceeds (n - 1) / sqrt(n) for a group of n
        assert in_group.abs().max().item() <= (len(in_group) - 1) / math.sqrt(len(in_group)) + 1e-3


def test_package_reexports_load_lazily_and_reject_unknown_names() -> None:
    import asyncrl.algorithms as algorithms
    from asyncrl.algorithms.grpo import grpo_advantages as module_grpo

    assert algorithms.grpo_advantages is module_grpo
    assert {"grpo_advantages", "ppo_clip_loss", "sequence_logprobs"} <= set(algorithms.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = algorithms.nope
