import math

import pytest

from asyncrl.config import DataConfig
from asyncrl.data import ArithmeticPrompts
from asyncrl.rewards import arithmetic_reward, load_reward_fn, score


@pytest.mark.parametrize(
    "response, expected",
    [("12", 1.2), ("12.", 1.2), ("The answer is 12.", 1.0), ("11", 0.2), ("no idea", 0.0), ("5 + 7 = 12", 1.0)],
)
def test_arithmetic_reward(response, expected):
    assert arithmetic_reward("What is 5 + 7?", response, answer="12") == pytest.approx(expected)


def test_negative_answers():
    assert arithmetic_reward("", "-3", answer="-3") == pytest.approx(1.2)


def _raises(prompt, response, **_):
    raise RuntimeError("boom")


def _nan(prompt, response, **_):
    return math.nan


def test_failing_reward_marks_only_that_sample():
    assert score(_raises, "p", "r", {}) == (0.0, True)
    assert score(_nan, "p", "r", {}) == (0.0, True)
    assert score(arithmetic_reward, "p", "4", {"answer": "4"}) == (pytest.approx(1.2), False)


def test_load_reward_fn():
    assert load_reward_fn("asyncrl.rewards:arithmetic_reward") is arithmetic_reward
    with pytest.raises(ValueError, match="no_such_module"):
        load_reward_fn("no_such_module:fn")
    with pytest.raises(ValueError, match="missing"):
        load_reward_fn("asyncrl.rewards:missing")


def test_prompts_are_seeded_and_correct():
    a, b = ArithmeticPrompts(DataConfig(seed=3)), ArithmeticPrompts(DataConfig(seed=3))
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    assert [a[i] for i in range(20)] != [ArithmeticPrompts(DataConfig(seed=4))[i] for i in range(20)]
    for i in range(50):
        p = a[i]
        x, op, y = p.text.removeprefix("What is ").split("?")[0].split()
        assert eval(f"{x}{op}{y}") == int(p.answer) >= 0
