"""math_reward and format_reward on the tricky cases: boxed answers, fractions, signs, separators, units."""

from fractions import Fraction

import pytest

from asyncrl.rewards import format_reward, last_boxed, load_reward_fn, math_reward, parse_answer, score


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"So the answer is $\boxed{1/2}$.", "0.5"),
        (r"\boxed{\frac{1}{2}}", "1/2"),
        (r"\boxed{\dfrac{1}{2}}", "0.5"),
        (r"\boxed{\frac12}", "1/2"),
        (r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{-\frac{1}{2}}", "-0.5"),
        (r"\boxed{\frac{\frac{1}{2}}{2}}", "0.25"),  # nested braces
        ("The result is -0", "0"),
        (r"\boxed{-0}", "0"),
        ("She has 12 apples", "12"),
        ("It costs $1,000 in total.", "1000"),
        (r"\boxed{\$1,000}", "1000"),
        (r"\boxed{1{,}000}", "1000"),
        ("About 5% of them", "5"),
        (r"\boxed{5\%}", "5"),
        (r"\boxed{2+3}", "5"),
        (r"\boxed{2^{10}}", "1024"),
        (r"\boxed{(1+2)\cdot 3}", "9"),
        (r"\boxed{12 \text{ apples}}", "12"),
        (r"\boxed{x = 7}", "7"),
        ("x = -3", "-3"),
        ("First 4, then 9, so 2.50", "2.5"),
        ("The answer is 1/3", "0.33333333"),
        (r"Let's see: 3 + 4 = 7. \boxed{7} Hmm, 8?", "7"),  # the box wins over a later number
        (r"First \boxed{3}, corrected: \boxed{4}", "4"),  # the last box wins
        ("1000000", "1e6"),
        ("12.", "12"),
    ],
)
def test_correct_answers_score_one(response, answer):
    assert math_reward("q", response, answer=answer) == 1.0


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{1/3}", "0.5"),
        ("She has 13 apples", "12"),
        ("5-3", "-3"),  # a subtraction, not a negative number: the last number is 3
        ("-3", "3"),
        (r"\boxed{}", "0"),
        ("no idea", "4"),
        ("", "0"),
        (r"\boxed{x}", "4"),
        (r"\boxed{1/0}", "0"),
        (r"\boxed{2^{1000}}", "0"),  # refused, not computed
        ("12 then 13", "12"),
        (r"\boxed{4 unclosed", "5"),
    ],
)
def test_wrong_or_missing_answers_score_zero(response, answer):
    assert math_reward("q", response, answer=answer) == 0.0


def test_unclosed_box_falls_back_to_the_last_number():
    assert last_boxed(r"\boxed{4 unclosed") is None
    assert math_reward("q", r"\boxed{4 unclosed", answer="4") == 1.0


def test_tolerance_is_relative():
    assert math_reward("q", "1000000.5", answer="1000000") == 1.0  # 5e-7 relative
    assert math_reward("q", "1.01", answer="1") == 0.0


def test_non_numeric_reference_compares_boxed_text():
    assert math_reward("q", r"\boxed{ B }", answer="B") == 1.0
    assert math_reward("q", r"\boxed{C}", answer="B") == 0.0
    assert math_reward("q", "B", answer="B") == 0.0  # no box, no number


def test_last_boxed_balances_braces():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \boxed{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None


def test_parse_answer_is_exact_and_never_evaluates_code():
    assert parse_answer(r"\frac{1}{3}") == Fraction(1, 3)
    assert parse_answer("2*3-4/2") == 4
    assert parse_answer("-2^2") == -4
    assert parse_answer("__import__('os')") is None
    assert parse_answer("(1+2") is None  # a broken expression has no value
    assert parse_answer("x = (1+2)") == 2  # words around it: the last number


def test_format_reward_default_wants_a_bare_integer():
    assert format_reward("q", " 42 \n") == 1.0
    assert format_reward("q", "-7") == 1.0
    assert format_reward("q", "The answer is 42") == 0.0
    assert format_reward("q", "reasoning\n42") == 0.0  # ^ and $ anchor the whole response
    assert format_reward("q", "reasoning\n42", pattern=r"(?m)^\d+$") == 1.0
    assert format_reward("q", "x", pattern=r"\\boxed\{") == 0.0


def test_math_reward_plugs_into_the_reward_boundary():
    fn = load_reward_fn("asyncrl.rewards:math_reward")
    assert score(fn, "q", r"\boxed{3}", {"answer": "3"}) == (1.0, False)
    assert score(load_reward_fn("asyncrl.rewards:format_reward"), "q", "3", {"answer": "3"}) == (1.0, False)


def test_huge_values_are_refused_or_exact_not_slow():
    assert parse_answer("((9^64)^64)^64") is None
    assert math_reward("q", r"\boxed{((9^64)^64)^64}", answer="64") == 0.0
    assert math_reward("q", r"\boxed{10^{300} + 1}", answer="1e300") == 1.0
    assert math_reward("q", r"\boxed{1e999}", answer="1e999") == 1.0  # no float overflow
