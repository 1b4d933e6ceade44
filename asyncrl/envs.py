"""Multi-turn environments: a rollout that takes several turns, with tool results appended between them.

An environment is any object with two methods (``Environment``)::

    reset(prompt, **metadata) -> str             # the first observation: the text the model sees first
    step(response) -> (observation, reward, done)

``run_episode`` drives one: it asks a ``generate(context) -> response`` callable for a turn, hands the
response to ``step``, appends the observation (a tool's result, say) to the context, and repeats until
the environment is done or ``max_turns`` run out. The episode's reward is the sum of the step rewards.
``Episode.segments`` tells the model's text from the environment's, which a trainer needs: only the
model's tokens are trained on, the observations are context.

An environment is named by a key of ``ENVIRONMENTS`` (``calculator``), by ``package.module:Class`` or
by ``path/to/file.py:Class``; ``load_environment`` returns a factory, called once per episode because
an environment holds the state of one episode.

``run_episode`` drives text (tests, offline use); a training run drives an environment through the rollout
worker's engine with ``rollout.env`` (``rollout.multiturn``), at the token level, with a ``loss_mask`` per row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from asyncrl.rewards import evaluate, math_reward
from asyncrl.rewards.interface import load_callable


@runtime_checkable
class Environment(Protocol):
    def reset(self, prompt: str, **metadata: Any) -> str:
        """Start an episode on ``prompt``; returns the first observation (the text the model continues)."""
        ...

    def step(self, response: str) -> tuple[str, float, bool]:
        """Take the model's turn; returns the observation to append, this step's reward, and whether it ended."""
        ...


@dataclass(frozen=True, slots=True)
class Turn:
    response: str
    """What the model wrote."""
    observation: str
    """What the environment appended after it ("" when the episode ended)."""
    reward: float
    """The reward of this step."""


@dataclass(slots=True)
class Episode:
    prompt: str
    """The first observation, from ``reset``."""
    turns: list[Turn] = field(default_factory=list)
    """The turns in order."""
    done: bool = False
    """The environment ended the episode (False: it ran out of turns)."""

    @property
    def reward(self) -> float:
        return sum(turn.reward for turn in self.turns)

    def segments(self) -> list[tuple[str, bool]]:
        """The episode's text in order, each piece flagged True where the model wrote it (the trained tokens)."""
        pieces = [(self.prompt, False)]
        for turn in self.turns:
            pieces.append((turn.response, True))
            if turn.observation:
                pieces.append((turn.observation, False))
        return pieces

    def transcript(self) -> str:
        return "".join(text for text, _ in self.segments())


def run_episode(
    env: Environment,
    generate: Callable[[str], str],
    prompt: str,
    metadata: Mapping[str, Any] | None = None,
    max_turns: int = 4,
) -> Episode:
    """Alternate ``generate`` and ``env.step`` until the environment is done or ``max_turns`` turns were taken."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    context = env.reset(prompt, **dict(metadata or {}))
    episode = Episode(prompt=context)
    for _ in range(max_turns):
        response = generate(context)
        observation, reward, done = env.step(response)
        episode.turns.append(Turn(response, observation if not done else "", float(reward)))
        if done:
            episode.done = True
            break
        context = context + response + observation
    return episode


# --- a built-in example: a calculator tool ------------------------------------------------------------------------

_CALC = re.compile(r"CALC:[ \t]*([^\n]*)")
_ANSWER = re.compile(r"ANSWER:[ \t]*([^\n]*)")


class CalculatorEnv:
    """The model may write ``CALC: <expression>`` and gets ``RESULT: <value>`` back; it ends with ``ANSWER: <n>``.

    The final step's reward is 1.0 when the answer equals the prompt's ``answer`` (``math_reward``'s
    comparison), else 0.0; other steps earn 0.0. An expression takes + - * / ^ and parentheses over
    numbers and is evaluated exactly, never with ``eval``. A response with neither line gets a reminder of
    the format back (``RESULT: error: ...``), as a tool error would come back; it counts as a call. A call
    beyond ``max_calls`` ends the episode with reward 0.0.
    """

    REMINDER = "\nRESULT: error: write `CALC: <expression>` or `ANSWER: <number>`\n"

    INSTRUCTIONS = (
        "\nYou have a calculator: write `CALC: <expression>` on its own line and stop; the result comes back "
        "as `RESULT: <value>`. Finish with `ANSWER: <number>`.\n"
    )

    def __init__(self, max_calls: int = 4) -> None:
        self.max_calls = max_calls
        self.answer = ""
        self.calls = 0

    def reset(self, prompt: str, *, answer: str, **_: Any) -> str:
        self.answer, self.calls = str(answer), 0
        return prompt + self.INSTRUCTIONS

    def step(self, response: str) -> tuple[str, float, bool]:
        final = _ANSWER.search(response)
        if final is not None:
            return "", math_reward("", final[1], answer=self.answer), True
        if self.calls >= self.max_calls:
            return "", 0.0, True
        self.calls += 1
        calc = _CALC.search(response)
        if calc is None:
            return self.REMINDER, 0.0, False
        value = evaluate(calc[1])
        result = "error: only numbers, + - * / ^ and parentheses" if value is None else _format(value)
        return f"\nRESULT: {result}\n", 0.0, False


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"calculator": CalculatorEnv}
"""Built-in environments by name."""


def load_environment(spec: str) -> Callable[..., Environment]:
    """A factory of fresh environments: a key of ``ENVIRONMENTS``, ``package.module:Class`` or ``file.py:Class``."""
    if spec in ENVIRONMENTS:
        return ENVIRONMENTS[spec]
    return load_callable(spec, "env")
