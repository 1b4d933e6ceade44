"""The rollout worker's pull rule under ``rollout.inflight_budget_s``: its decode rate and the groups it may take."""

import math

import pytest

from rollout.worker import RATE_HORIZON_S, DecodeRate, groups_within_budget


def test_the_decode_rate_is_zero_before_the_first_step_and_the_plain_rate_after_one():
    rate = DecodeRate()
    assert rate.tokens_per_s == 0.0
    rate.record(40, 0.5)
    assert rate.tokens_per_s == pytest.approx(80.0)
    assert (rate.tokens, rate.busy_seconds) == (40, 0.5)


def test_the_decode_rate_follows_a_change_of_speed_within_a_few_horizons():
    rate = DecodeRate()
    for _ in range(100):
        rate.record(100, 0.1)  # 1000 tokens/s for 10 s
    assert rate.tokens_per_s == pytest.approx(1000.0)
    for _ in range(int(3 * RATE_HORIZON_S / 0.1)):
        rate.record(10, 0.1)  # then 100 tokens/s for three horizons
    # The old speed's weight is exp(-3) of the mean: the rate sits near the new speed, not the average since start.
    old_weight = math.exp(-3)
    expected = (old_weight * 1000 + (1 - old_weight) * 100) / 1.0
    assert rate.tokens_per_s == pytest.approx(expected, rel=0.02)
    assert rate.tokens / rate.busy_seconds == pytest.approx((10000 + 600) / 16.0)  # the totals still count it all


def test_one_step_of_noise_barely_moves_the_rate():
    rate = DecodeRate()
    for _ in range(50):
        rate.record(50, 0.1)
    rate.record(0, 0.1)  # one step that sampled nothing (a sync, a long prefill)
    assert rate.tokens_per_s == pytest.approx(500.0, rel=0.1)


@pytest.mark.parametrize(
    ("rate", "pending", "idle", "expected"),
    [
        (0.0, 0, True, 1),  # no rate yet: one group, when idle
        (0.0, 0, False, 0),  # no rate yet and busy: none
        (1000.0, 0, False, 4),  # 1 s budget at 1000 tokens/s holds 1000 tokens = 4 groups of 256
        (1000.0, 0, True, 4),
        (1000.0, 900, False, 1),  # 100 tokens of room: ceil rounds up to one group
        (1000.0, 1000, False, 0),  # the running requests fill the budget
        (1000.0, 5000, False, 0),  # over it: never negative
        (1000.0, 5000, True, 1),  # an idle engine always takes one (cannot happen with pending work, but is safe)
        (100.0, 0, False, 1),  # a slow worker: 100 tokens of room, one group
        (100.0, 0, True, 1),
    ],
)
def test_groups_within_the_budget(rate, pending, idle, expected):
    assert groups_within_budget(1.0, rate, pending, 256, idle) == expected


def test_a_worker_five_times_faster_may_hold_about_five_times_the_work():
    fast = groups_within_budget(2.0, 5000.0, 0, 1000, idle=False)
    slow = groups_within_budget(2.0, 1000.0, 0, 1000, idle=False)
    assert (fast, slow) == (10, 2)
