"""A reward function that fails on purpose, for the fault-boundary test (imported by the rollout workers)."""

import math


def flaky_reward(prompt: str, response: str, *, answer: str, **_: object) -> float:
    """Raises on responses with an even length, returns NaN on lengths divisible by 3, else 1.0."""
    if len(response) % 2 == 0:
        raise RuntimeError("this reward fails on purpose")
    if len(response) % 3 == 0:
        return math.nan
    return 1.0


def flaky_components(prompt: str, response: str, *, answer: str, **_: object) -> dict[str, float]:
    """``flaky_reward`` as the total, plus the response's length as a component (the file must stay self-contained:
    the end-to-end test copies it out of the repository and names it by path)."""
    return {"total": flaky_reward(prompt, response, answer=answer), "length": float(len(response))}
