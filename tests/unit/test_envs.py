"""The multi-turn environment interface, its episode driver, and the built-in calculator environment."""

from __future__ import annotations

import textwrap

import pytest

from asyncrl.envs import CalculatorEnv, Environment, load_environment, run_episode


def _scripted(*responses):
    """A stand-in for the policy: answers in order, and keeps the contexts it was shown."""
    contexts = []

    def generate(context: str) -> str:
        contexts.append(context)
        return responses[len(contexts) - 1]

    generate.contexts = contexts
    return generate


def test_a_calculator_episode_appends_tool_results_and_rewards_the_answer():
    generate = _scripted("Let me compute.\nCALC: 12*7", "ANSWER: 84")
    episode = run_episode(CalculatorEnv(), generate, "What is 12 times 7?", {"answer": "84"})
    assert episode.done and episode.reward == 1.0 and len(episode.turns) == 2
    assert generate.contexts[0] == "What is 12 times 7?" + CalculatorEnv.INSTRUCTIONS
    assert generate.contexts[1] == generate.contexts[0] + "Let me compute.\nCALC: 12*7" + "\nRESULT: 84\n"
    assert [trained for _, trained in episode.segments()] == [False, True, False, True]
    assert episode.transcript() == generate.contexts[1] + "ANSWER: 84"


@pytest.mark.parametrize(
    "responses, reward, done, turns",
    [
        (["ANSWER: 83"], 0.0, True, 1),  # wrong
        (["ANSWER: 84.0"], 1.0, True, 1),  # compared as numbers
        (["I think it is 84", "ANSWER: 84"], 1.0, True, 2),  # neither line: a format reminder, and it goes on
        (["no", "no", "no", "no", "no"], 0.0, True, 5),  # reminders count as calls: the fifth ends it
        (["CALC: 2^3^2", "ANSWER: 84"], 1.0, True, 2),
        (["CALC: 1", "CALC: 2", "CALC: 3", "CALC: 4", "CALC: 5"], 0.0, True, 5),  # past max_calls=4 it ends
    ],
)
def test_calculator_outcomes(responses, reward, done, turns):
    episode = run_episode(CalculatorEnv(), _scripted(*responses), "q", {"answer": "84"}, max_turns=5)
    assert (episode.reward, episode.done, len(episode.turns)) == (reward, done, turns)


@pytest.mark.parametrize(
    "expression, result",
    [("12*7", "84"), ("(1+2)/4", "0.75"), ("2^10", "1024"), ("1/0", "error"), ("__import__('os')", "error")],
)
def test_calculator_evaluates_exactly_and_never_with_eval(expression, result):
    env = CalculatorEnv()
    env.reset("q", answer="0")
    observation, reward, done = env.step(f"CALC: {expression}")
    assert observation.startswith(f"\nRESULT: {result}") and (reward, done) == (0.0, False)


def test_an_episode_that_runs_out_of_turns_is_not_done():
    episode = run_episode(CalculatorEnv(), _scripted("CALC: 1", "CALC: 2"), "q", {"answer": "84"}, max_turns=2)
    assert (episode.done, len(episode.turns), episode.reward) == (False, 2, 0.0)
    assert episode.turns[-1].observation == "\nRESULT: 2\n"


def test_calculator_reminds_of_the_format():
    env = CalculatorEnv()
    env.reset("q", answer="1")
    assert env.step("hello") == (CalculatorEnv.REMINDER, 0.0, False)


def test_calculator_ends_after_max_calls():
    env = CalculatorEnv(max_calls=1)
    env.reset("q", answer="1")
    assert env.step("CALC: 1+1")[2] is False
    assert env.step("CALC: 1+1") == ("", 0.0, True)


def test_environments_load_by_name_dotted_path_and_file(tmp_path):
    assert load_environment("calculator") is CalculatorEnv
    assert load_environment("asyncrl.envs:CalculatorEnv") is CalculatorEnv
    path = tmp_path / "my_env.py"
    path.write_text(
        textwrap.dedent(
            """
            class Echo:
                def reset(self, prompt, **metadata):
                    return prompt
                def step(self, response):
                    return "", float(response == "hi"), True
            """
        )
    )
    factory = load_environment(f"{path}:Echo")
    env = factory()
    assert isinstance(env, Environment) and isinstance(CalculatorEnv(), Environment)
    assert run_episode(env, _scripted("hi"), "say hi").reward == 1.0
    with pytest.raises(ValueError, match="env"):
        load_environment("asyncrl.envs:NoSuchEnv")


def test_run_episode_needs_a_turn():
    with pytest.raises(ValueError, match="max_turns"):
        run_episode(CalculatorEnv(), _scripted(), "q", {"answer": "1"}, max_turns=0)
