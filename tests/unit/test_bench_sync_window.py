"""`asyncrl bench sync` counts a window's decode tokens pro rata of the steps it cuts."""

import pytest

from asyncrl.bench.sync import tokens_in_window

# (end of step, tokens, version): steps of 10 tokens ending at 1, 2, 3, 4 s (the first one's start is unknown).
STEPS = [(1.0, 10, 0), (2.0, 10, 0), (3.0, 10, 0), (4.0, 10, 0)]


def test_a_window_over_whole_steps_counts_them_whole():
    assert tokens_in_window(STEPS, 1.0, 3.0) == pytest.approx(20.0)


def test_a_window_that_cuts_steps_counts_the_part_inside():
    # (1.5, 2.25]: half of the step ending at 2, a quarter of the one ending at 3.
    assert tokens_in_window(STEPS, 1.5, 2.25) == pytest.approx(7.5)


def test_the_first_step_counts_whole_at_its_end_and_tokens_outside_do_not_count():
    assert tokens_in_window(STEPS, 0.5, 1.0) == pytest.approx(10.0)
    assert tokens_in_window(STEPS, 4.0, 9.0) == 0.0
    assert tokens_in_window(STEPS, 0.0, 9.0) == pytest.approx(40.0)


def test_steps_ending_at_the_same_moment_count_at_that_moment():
    steps = [(1.0, 10, 0), (1.0, 4, 0), (2.0, 10, 0)]
    assert tokens_in_window(steps, 0.5, 1.0) == pytest.approx(14.0)
    assert tokens_in_window(steps, 1.0, 1.5) == pytest.approx(5.0)
