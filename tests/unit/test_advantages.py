"""Advantage estimators, the equal-group filter and the overlong penalty against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.algorithms.dr_grpo import dr_grpo_advantages
from asyncrl.algorithms.group_filter import group_keep_mask
from asyncrl.algorithms.grpo import grpo_advantages
from asyncrl.algorithms.overlong import overlong_penalty
from asyncrl.algorithms.registry import ADVANTAGES, get_advantage
from asyncrl.algorithms.reinforce_pp import reinforce_pp_advantages
from asyncrl.algorithms.rloo import rloo_advantages

GROUP_BASELINE = ["grpo", "dr_grpo", "rloo"]


def test_grpo_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 10.0])
    groups = torch.tensor([0, 0, 0, 0, 5, 5, 5])

    advantages = grpo_advantages(rewards, groups)

    # group 0: mean 0.5, centred +-0.5, sample variance 4 * 0.25 / 3 = 1/3, std 0.577350 -> +-0.866025
    # group 5: mean 6, centred -3 -1 4, sample variance (9 + 1 + 16) / 2 = 13, std 3.605551
    #          -> -3 / 3.605551 = -0.832050, -1 / 3.605551 = -0.277350, 4 / 3.605551 = 1.109400
    expected = [0.866025, -0.866025, -0.866025, 0.866025, -0.832050, -0.277350, 1.109400]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)


def test_dr_grpo_by_hand_keeps_the_reward_scale() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 10.0, 0.9, 0.9, 0.9])
    groups = torch.tensor([0, 0, 0, 0, 5, 5, 5, 2, 2, 2])

    advantages = dr_grpo_advantages(rewards, groups)

    # group 0: r - 0.5; group 5: r - 6 (no division by the std 3.6); group 2: all equal -> exactly 0
    assert advantages[:7].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, -3.0, -1.0, 4.0], abs=1e-6)
    # in float32 (0.9 + 0.9 + 0.9) / 3 is 0.9 - 6e-8: the zero must be explicit, not rounding luck
    assert torch.equal(advantages[7:], torch.zeros(3))


def test_rloo_by_hand_uses_the_leave_one_out_baseline() -> None:
    rewards = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 7.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3, 3])

    advantages = rloo_advantages(rewards, groups)

    # group 0: 3 - (1 + 2) / 2 = 1.5, 1 - (3 + 2) / 2 = -1.5, 2 - (3 + 1) / 2 = 0
    # group 1: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3
    # group 2: a single sample has no other to form a baseline -> 0; group 3: all equal -> 0
    expected = [1.5, -1.5, 0.0, 2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(advantages[7:], torch.zeros(3))


def test_reinforce_pp_by_hand_normalises_over_the_batch_not_the_group() -> None:
    rewards = torch.tensor([2.0, 2.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])

    advantages = reinforce_pp_advantages(rewards, groups)

    # batch mean 5/4 = 1.25, centred 0.75 0.75 -1.25 -0.25,
    # sample variance (0.5625 + 0.5625 + 1.5625 + 0.0625) / 3 = 0.916667, std 0.957427
    # -> 0.783349 0.783349 -1.305582 -0.261116
    assert advantages.tolist() == pytest.approx([0.783349, 0.783349, -1.305582, -0.261116], rel=1e-5)
    # group 0's rewards are all equal, yet it is above the batch mean: no group baseline
    assert advantages[0] > 0
    # group 1's better sample still sits below the batch mean
    assert advantages[3] < 0


def test_reinforce_pp_ignores_the_group_ids() -> None:
    rewards = torch.tensor([2.0, 2.0, 0.0, 1.0])
    assert torch.equal(
        reinforce_pp_advantages(rewards, torch.tensor([0, 0, 1, 1])),
        reinforce_pp_advantages(rewards, torch.tensor([3, 1, 4, 1])),
    )


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_all_equal_rewards_give_exactly_zero(name: str) -> None:
    # every group all equal, and so the whole batch too; a single-sample group included. In
    # float32 the mean of three (or seven) 0.9s is off by 6e-8, so only an explicit zero passes.
    rewards = torch.full((7,), 0.9)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    assert torch.equal(get_advantage(name)(rewards, groups), torch.zeros(7))


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_estimators_take_integer_rewards_and_return_floats(name: str) -> None:
    advantages = get_advantage(name)(torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))
    assert advantages.dtype == torch.float32 and advantages.shape == (4,)
    assert advantages[0] > 0 > advantages[1]


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_estimators_reject_mismatched_shapes(name: str) -> None:
    with pytest.raises(ValueError, match=r"must both be \[B\], got \(3,\) and \(4,\)"):
        get_advantage(name)(torch.zeros(3), torch.zeros(4, dtype=torch.int64))


def test_registry_names_every_estimator_and_rejects_an_unknown_one() -> None:
    assert get_advantage("grpo") is grpo_advantages
    assert get_advantage("dr_grpo") is dr_grpo_advantages
    assert get_advantage("rloo") is rloo_advantages
    assert get_advantage("reinforce_pp") is reinforce_pp_advantages
    with pytest.raises(
        ValueError, match="unknown advantage estimator 'ppo'; allowed: grpo, dr_grpo, rloo, reinforce_pp"
    ):
        get_advantage("ppo")


def test_group_keep_mask_by_hand() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 0.5, 0.5, 0.5, 0.0, 0.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4])

    keep = group_keep_mask(rewards, groups)

    # group 0 all 1, group 2 a single sample, group 3 all 0.5: dropped; groups 1 and 4 differ: kept
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False, False, False, True, True, True]


def test_overlong_penalty_by_hand() -> None:
    lengths = torch.tensor([5, 6, 7, 9, 10, 12])

    # max_len 10, buffer 4: free up to 10 - 4 = 6 tokens, then -(length - 6) / 4, floored at -1
    # 5 -> 0, 6 -> 0, 7 -> -1/4, 9 -> -3/4, 10 -> -1, 12 (beyond the limit) -> -1
    assert overlong_penalty(lengths, max_len=10, buffer=4).tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    # the penalty scales the whole ramp
    assert overlong_penalty(lengths, max_len=10, buffer=4, penalty=0.5).tolist() == [0, 0, -0.125, -0.375, -0.5, -0.5]
    # buffer 0 is off
    assert torch.equal(overlong_penalty(lengths, max_len=10, buffer=0), torch.zeros(6))


def test_overlong_penalty_rejects_a_buffer_longer_than_the_limit() -> None:
    with pytest.raises(ValueError, match=r"overlong buffer must be in \[0, max_len=10\], got 11"):
        overlong_penalty(torch.tensor([3]), max_len=10, buffer=11)


_samples = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5), st.floats(min_value=-100, max_value=100, width=32)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=50, deadline=None)
@given(_samples, st.sampled_from(GROUP_BASELINE))
def test_group_baseline_advantages_sum_to_zero_in_every_group(samples: list[tuple[int, float]], name: str) -> None:
    groups = torch.tensor([group for group, _ in samples])
    rewards = torch.tensor([reward for _, reward in samples], dtype=torch.float32)

    advantages = get_advantage(name)(rewards, groups)

    assert torch.isfinite(advantages).all()
    for group in groups.unique():
        in_group = advantages[groups == group]
        scale = max(1.0, rewards[groups == group].abs().max().item()) if name != "grpo" else 1.0
        assert abs(in_group.sum().item()) <= 1e-4 * scale * len(in_group)


@settings(max_examples=50, deadline=None)
@given(_samples)
def test_reinforce_pp_advantages_sum_to_zero_over_the_batch(samples: list[tuple[int, float]]) -> None:
    rewards = torch.tensor([reward for _, reward in samples], dtype=torch.float32)

    advantages = reinforce_pp_advantages(rewards, torch.tensor([group for group, _ in samples]))

    assert torch.isfinite(advantages).all()
    assert abs(advantages.sum().item()) <= 1e-3 * len(samples)
    # standardised: no |advantage| exceeds (n - 1) / sqrt(n) for a batch of n
    assert advantages.abs().max().item() <= (len(samples) - 1) / math.sqrt(len(samples)) + 1e-3


@settings(max_examples=50, deadline=None)
@given(_samples)
def test_group_keep_mask_agrees_with_grpo_signal(samples: list[tuple[int, float]]) -> None:
    """A group is kept exactly when GRPO gives it a non-zero advantage somewhere."""
    groups = torch.tensor([group for group, _ in samples])
    rewards = torch.tensor([reward for _, reward in samples], dtype=torch.float32)

    keep = group_keep_mask(rewards, groups)
    advantages = grpo_advantages(rewards, groups)

    for group in groups.unique():
        in_group = groups == group
        assert keep[in_group].all() or not keep[in_group].any()
        assert bool(keep[in_group][0]) == bool((advantages[in_group] != 0).any())
