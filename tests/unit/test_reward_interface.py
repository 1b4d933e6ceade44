"""Contract tests of the reward interface: what a reward may return, and how the fault boundary treats each case."""

from __future__ import annotations

import logging
import math
import textwrap
import threading
import time

import pytest

from asyncrl import config as config_module
from asyncrl.config import ConfigError, load_config, to_yaml
from asyncrl.controller import _component_means, _failure_counts
from asyncrl.rewards import (
    REWARD_MODELS,
    RewardScorer,
    RewardTerm,
    arithmetic_reward,
    batched,
    build_scorer,
    format_reward,
    load_reward_fn,
    math_reward,
    score,
)
from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows


def _scorer(*fns, weights=None, timeout_s=0.0, max_hung_calls=8):
    weights = weights or [1.0] * len(fns)
    terms = [RewardTerm(fn.__name__, fn, weight) for fn, weight in zip(fns, weights, strict=True)]
    return RewardScorer(terms, timeout_s=timeout_s, max_hung_calls=max_hung_calls, named_components=len(fns) > 1)


def _one(scorer, response="r", **metadata):
    return scorer.score_one("p", response, metadata)


# --- what a reward may return ------------------------------------------------------------------------------------


def test_a_float_is_the_reward():
    result = _one(_scorer(lambda prompt, response, **_: 0.5))
    assert (result.reward, result.failed, result.components) == (0.5, False, {})


@pytest.mark.parametrize("value", [True, 3, 0.25])
def test_anything_float_converts_is_accepted(value):
    np = pytest.importorskip("numpy")
    assert _one(_scorer(lambda p, r, **_: value)).reward == float(value)
    assert _one(_scorer(lambda p, r, **_: np.float32(value))).reward == pytest.approx(float(value))


def test_a_dict_with_total_gives_components_that_are_recorded_not_added():
    result = _one(_scorer(lambda p, r, **_: {"total": 1.0, "correct": 1.0, "length": 12.0}))
    assert result.reward == 1.0 and not result.failed
    assert result.components == {"correct": 1.0, "length": 12.0}


def test_a_dict_without_total_is_summed():
    result = _one(_scorer(lambda p, r, **_: {"correct": 1.0, "format": 0.25}))
    assert result.reward == 1.25 and result.components == {"correct": 1.0, "format": 0.25}


def test_metadata_reaches_the_function_as_keywords():
    seen = {}

    def reward(prompt, response, *, answer, extra):
        seen.update(prompt=prompt, response=response, answer=answer, extra=extra)
        return 1.0

    assert _one(_scorer(reward), "resp", answer="4", extra=7).reward == 1.0
    assert seen == {"prompt": "p", "response": "resp", "answer": "4", "extra": 7}


# --- the fault boundary ------------------------------------------------------------------------------------------


def _raises(prompt, response, **_):
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    "value, kind",
    [
        (math.nan, "NonFiniteReward"),
        (math.inf, "NonFiniteReward"),
        (-math.inf, "NonFiniteReward"),
        ({"total": 1.0, "part": math.nan}, "NonFiniteReward"),  # a bad component fails the sample too
        ({"part": math.inf}, "NonFiniteReward"),
        ({"a": 1e308, "b": 1e308}, "NonFiniteReward"),  # a sum that overflows
        ("1.0", "TypeError"),  # a string is not a number, even one that parses
        (None, "TypeError"),
        ([1.0], "TypeError"),
        ({}, "TypeError"),
        ({1: 1.0}, "TypeError"),
        ({"part": "high"}, "TypeError"),
    ],
)
def test_a_bad_value_fails_only_that_sample_and_is_counted(value, kind):
    def reward(prompt, response, **_):
        return value if response == "bad" else 1.0

    scorer = _scorer(reward)
    results = scorer.score_batch(["p"] * 3, ["ok", "bad", "ok"], [{}] * 3)
    assert [(r.reward, r.failed) for r in results] == [(1.0, False), (0.0, True), (1.0, False)]
    assert [r.error for r in results] == [None, kind, None]  # the kind the trajectory row and the metric carry
    assert scorer.failures == {("reward", kind): 1}


def test_an_exception_fails_the_sample_and_is_logged_once_per_kind(caplog):
    scorer = _scorer(_raises)
    with caplog.at_level(logging.DEBUG, logger="asyncrl.rewards.interface"):
        results = scorer.score_batch(["p"] * 3, ["a", "b", "c"], [{}] * 3)
    assert all(r.failed and r.reward == 0.0 and r.error == "RuntimeError" for r in results)
    assert scorer.failures == {("_raises", "RuntimeError"): 3}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0].getMessage() and "boom" in warnings[0].getMessage()


def test_the_legacy_score_helper():
    assert score(_raises, "p", "r", {}) == (0.0, True)
    assert score(lambda p, r, **_: math.nan, "p", "r", {}) == (0.0, True)
    assert score(arithmetic_reward, "p", "4", {"answer": "4"}) == (pytest.approx(1.2), False)


# --- timeouts ----------------------------------------------------------------------------------------------------


def test_a_reward_past_its_timeout_fails_the_sample_and_the_call_returns_on_time():
    release = threading.Event()

    def slow(prompt, response, **_):
        if response == "slow":
            release.wait(10)
        return 1.0

    scorer = _scorer(slow, timeout_s=0.2)
    try:
        tic = time.monotonic()
        results = scorer.score_batch(["p"] * 2, ["slow", "fast"], [{}] * 2)
        assert time.monotonic() - tic < 2.0
    finally:
        release.set()
    assert [(r.reward, r.failed) for r in results] == [(0.0, True), (1.0, False)]
    assert [r.error for r in results] == ["RewardTimeout", None]
    assert scorer.failures == {("slow", "RewardTimeout"): 1}


def test_errors_raised_inside_the_deadline_thread_still_fail_only_the_sample():
    scorer = _scorer(_raises, timeout_s=5.0)
    assert _one(scorer).failed and scorer.failures == {("_raises", "RuntimeError"): 1}


def test_too_many_hung_calls_stop_the_scorer_instead_of_leaking_threads():
    release = threading.Event()

    def hangs(prompt, response, **_):
        release.wait(30)
        return 1.0

    scorer = _scorer(hangs, timeout_s=0.05, max_hung_calls=2)
    try:
        assert all(r.failed for r in scorer.score_batch(["p"] * 2, ["a", "b"], [{}] * 2))
        with pytest.raises(RuntimeError, match=r"hangs.*reward.max_hung_calls=2"):
            _one(scorer)
        release.set()  # the hung calls finish: the scorer works again
        deadline = time.monotonic() + 5
        while any(t.is_alive() for t in threading.enumerate() if t.name == "reward-hangs"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not _one(scorer).failed
    finally:
        release.set()


# --- batched rewards ---------------------------------------------------------------------------------------------


def test_a_batched_reward_is_called_once_with_lists():
    calls = []

    @batched
    def lengths(prompts, responses, metadata):
        calls.append((prompts, responses, metadata))
        return [float(len(r)) if r != "nan" else math.nan for r in responses]

    scorer = _scorer(lengths)
    results = scorer.score_batch(["p"] * 3, ["ab", "nan", "abcd"], [{"answer": str(i)} for i in range(3)])
    assert calls == [(["p", "p", "p"], ["ab", "nan", "abcd"], [{"answer": "0"}, {"answer": "1"}, {"answer": "2"}])]
    assert [(r.reward, r.failed) for r in results] == [(2.0, False), (0.0, True), (4.0, False)]  # NaN: that one only


def test_a_batched_reward_may_return_an_array():
    np = pytest.importorskip("numpy")
    scorer = _scorer(batched(lambda prompts, responses, metadata: np.arange(len(responses), dtype=np.float32)))
    assert [r.reward for r in scorer.score_batch(["p"] * 3, ["a", "b", "c"], [{}] * 3)] == [0.0, 1.0, 2.0]


class _Batched:
    batched = True  # the attribute form of the mark

    def __init__(self, answer):
        self.answer = answer

    def __call__(self, prompts, responses, metadata):
        return self.answer(responses)


@pytest.mark.parametrize(
    "answer, kind",
    [
        (lambda responses: [1.0] * (len(responses) - 1), "ValueError"),  # wrong length
        (lambda responses: 1.0, "TypeError"),
        (lambda responses: "1" * len(responses), "TypeError"),
        (lambda responses: {r: 1.0 for r in responses}, "TypeError"),
        (lambda responses: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_a_batched_reward_that_raises_or_returns_a_bad_batch_fails_the_whole_batch(answer, kind):
    scorer = RewardScorer([RewardTerm("rm", _Batched(answer))])
    results = scorer.score_batch(["p"] * 3, ["a", "b", "c"], [{}] * 3)
    assert all(r.failed and r.reward == 0.0 for r in results)
    assert scorer.failures == {("rm", kind): 3}


def test_a_batched_reward_past_its_timeout_fails_the_batch():
    release = threading.Event()
    scorer = RewardScorer([RewardTerm("rm", _Batched(lambda rs: release.wait(10) and [1.0] * len(rs)))], timeout_s=0.1)
    try:
        assert all(r.failed for r in scorer.score_batch(["p"] * 2, ["a", "b"], [{}] * 2))
    finally:
        release.set()
    assert scorer.failures == {("rm", "RewardTimeout"): 2}


# --- several rewards with weights --------------------------------------------------------------------------------


def correct(prompt, response, *, answer, **_):
    return float(response == answer)


def style(prompt, response, **_):
    if response == "boom":
        raise ValueError("style broke")
    return {"short": float(len(response) < 3), "polite": 0.5}


def test_weighted_rewards_sum_and_each_is_recorded_by_name():
    scorer = _scorer(correct, style, weights=[2.0, 0.5])
    results = scorer.score_batch(["p"] * 2, ["4", "four"], [{"answer": "4"}] * 2)
    assert results[0].reward == pytest.approx(2.0 * 1.0 + 0.5 * 1.5)
    assert results[0].components == {"correct": 1.0, "style": 1.5, "style/short": 1.0, "style/polite": 0.5}
    assert results[1].reward == pytest.approx(0.5 * 0.5)
    assert results[1].components["correct"] == 0.0


def test_one_failing_reward_fails_the_sample_but_keeps_the_other_components():
    scorer = _scorer(correct, style)
    result = scorer.score_one("p", "boom", {"answer": "boom"})
    assert result.failed and result.reward == 0.0
    assert result.components == {"correct": 1.0}
    assert scorer.failures == {("style", "ValueError"): 1}


# --- built-in rewards honour the contract ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, response, metadata",
    [
        (arithmetic_reward, "12", {"answer": "12"}),
        (math_reward, r"\boxed{12}", {"answer": "12"}),
        (format_reward, "12", {"answer": "12"}),
        (format_reward, "x", {"answer": "12", "pattern": "x"}),
    ],
)
def test_builtin_rewards_return_finite_floats_and_ignore_unknown_metadata(fn, response, metadata):
    value = fn("What is 5 + 7?", response, **metadata, unknown_key="ignored")
    assert isinstance(value, float) and math.isfinite(value)
    assert not score(fn, "What is 5 + 7?", response, metadata)[1]


# --- loading, the config, and a user's file ----------------------------------------------------------------------

USER_REWARDS = textwrap.dedent(
    """
    from dataclasses import dataclass

    @dataclass
    class Weights:  # a dataclass needs its module in sys.modules while the file runs
        length: float = 0.1

    def score(prompt, response, *, answer, **_):
        correct = float(response.strip() == answer)
        return {"total": correct + Weights().length * len(response), "correct": correct}
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "outside" / "my_rewards.py"
    path.parent.mkdir()
    path.write_text(USER_REWARDS)
    return path


def test_a_user_reward_in_a_file_outside_the_package_loads_by_path(user_file):
    fn = load_reward_fn(f"{user_file}:score")
    assert fn("p", "4", answer="4") == {"total": pytest.approx(1.1), "correct": 1.0}
    assert load_reward_fn(f"{user_file}:score") is fn  # imported once per process


def test_a_user_file_through_the_config_and_the_scorer(user_file, tmp_path, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    cfg = load_config(None, ["reward.fn=my_rewards.py:score"])
    assert cfg.reward.fn == f"{user_file.resolve()}:score"  # absolute: workers may start elsewhere
    monkeypatch.chdir(tmp_path)
    result = build_scorer(cfg.reward).score_one("p", "4", {"answer": "4"})
    assert (result.reward, result.failed, result.components) == (pytest.approx(1.1), False, {"correct": 1.0})


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module:fn", "no_such_module"),
        ("asyncrl.rewards:missing", "missing"),
        ("/no/such/file.py:fn", "not found"),
        ("no_colon", "package.module:name"),
    ],
)
def test_load_errors_name_what_is_missing(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_reward_fn(spec)


def test_load_reward_fn_keeps_module_specs():
    assert load_reward_fn("asyncrl.rewards:arithmetic_reward") is arithmetic_reward
    assert load_reward_fn("asyncrl.rewards.builtin:math_reward") is math_reward


def test_config_fns_weights_and_names(user_file):
    cfg = load_config(
        None,
        [f"reward.fns=[{{fn: 'asyncrl.rewards:math_reward', weight: 2.0}}, {{fn: '{user_file}:score', name: mine}}]"],
    )
    assert [(t.fn, t.weight, t.name) for t in cfg.reward.fns] == [
        ("asyncrl.rewards:math_reward", 2.0, "math_reward"),  # the name defaults to the function's
        (f"{user_file}:score", 1.0, "mine"),
    ]
    result = build_scorer(cfg.reward).score_one("p", "4", {"answer": "4"})
    assert result.reward == pytest.approx(2.0 * 1.0 + 1.1)
    assert result.components == {"math_reward": 1.0, "mine": pytest.approx(1.1), "mine/correct": 1.0}


def test_config_round_trips_with_fns(tmp_path):
    cfg = load_config(None, ["reward.fns=[{fn: 'asyncrl.rewards:math_reward'}]", "reward.timeout_s=5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["reward.fn=nocolon"], "reward.fn must be package.module:function"),
        (["reward.fn=missing_file.py:score"], "reward.fn: reward file not found"),
        (["reward.fn=asyncrl.rewards:math_reward", "reward.fns=[{fn: 'a:b'}]"], "not both"),
        (["reward.fns=[{weight: 1.0}]"], r"reward.fns\[0\].fn is required"),
        (["reward.fns=[{fn: 'a:b'}, {fn: 'c:b'}]"], "names must be unique, b repeats"),
        (["reward.fns=[{fn: 'a:b', weight: .nan}]"], r"reward.fns\[0\].weight must be finite"),
        (["reward.timeout_s=-1"], "reward.timeout_s must be >= 0"),
        (["reward.max_hung_calls=0"], "reward.max_hung_calls must be >= 1"),
        (["reward.fn=http"], "reward.http.url is required"),
        (["reward.fn=http", "reward.http.url=ftp://x"], "reward.http.url must start with http"),
        (["reward.http.max_retries=-1"], "reward.http.max_retries must be >= 0"),
        (["reward.fn=local_rm"], "reward.local_rm.path is required"),
        (["reward.fn=local_rm", "reward.local_rm.path=/no/such/folder"], "reward.local_rm.path: folder not found"),
        (["reward.local_rm.batch_size=0"], "reward.local_rm.batch_size must be >= 1"),
    ],
)
def test_reward_config_errors_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_config_and_interface_agree_on_the_builtin_reward_models():
    assert tuple(REWARD_MODELS) == config_module.REWARD_MODELS


# --- what reaches the trajectory rows and the metrics ------------------------------------------------------------


def test_components_fit_the_trajectory_schema():
    row = {name: None for name in TRAJECTORY_SCHEMA.names}
    table = table_from_rows(
        [{**row, "reward_components": {"correct": 1.0, "length": 3.0}}, {**row, "reward_components": {}}, row],
        TRAJECTORY_SCHEMA,
    )
    assert [dict(v or ()) for v in table.column("reward_components").to_pylist()] == [
        {"correct": 1.0, "length": 3.0},
        {},
        {},
    ]


def test_per_component_means_cover_the_samples_that_computed_each():
    ledger = [
        {"reward_components": {"correct": 1.0, "length": 4.0}},
        {"reward_components": {"correct": 0.0}},
        {"reward_components": {}},
        {},
    ]
    assert _component_means(ledger) == {"reward/correct": 0.5, "reward/length": 4.0}


def test_failures_are_counted_per_kind():
    ledger = [
        {"reward_failed": True, "reward_error": "RewardTimeout"},
        {"reward_failed": True, "reward_error": "NonFiniteReward"},
        {"reward_failed": True, "reward_error": "RewardTimeout"},
        {"reward_failed": False, "reward_error": None},
        {"reward_failed": True},  # a row from an older writer names no kind
    ]
    assert _failure_counts(ledger) == {
        "reward_failed_by/NonFiniteReward": 1,
        "reward_failed_by/RewardTimeout": 2,
        "reward_failed_by/unknown": 1,
    }
