"""A reward that takes its time, for the resume tests (imported by the rollout workers by path).

Tiny-model steps take ~0.1 s, so a run would finish before a test could kill it between two checkpoints; 50 ms a
sample makes each step (8 samples) last about half a second. It returns 0.0, as the tiny model's answers earn.
"""

import time


def slow_reward(prompt: str, response: str, *, answer: str, **_: object) -> float:
    time.sleep(0.05)
    return 0.0
