"""Rewards: the interface and its fault boundary (``interface``), built-in rewards (``builtin``), and reward models
over HTTP (``http``) and in process (``local_rm``).

A reward is a plain callable ``fn(prompt, response, **metadata) -> float | dict[str, float]``, named in
the config as ``package.module:function`` or ``path/to/file.py:function``; see ``asyncrl.rewards.interface``.
"""

from asyncrl.rewards.builtin import (
    arithmetic_reward,
    code_reward,
    evaluate,
    format_reward,
    last_boxed,
    last_number_text,
    math_reward,
    parse_answer,
)
from asyncrl.rewards.http import HttpRewardModel, RewardModelUnavailable
from asyncrl.rewards.interface import (
    REWARD_MODELS,
    TOTAL,
    NonFiniteReward,
    RewardFn,
    RewardResult,
    RewardScorer,
    RewardTerm,
    RewardTimeout,
    batched,
    build_reward_fn,
    build_scorer,
    is_batched,
    load_reward_fn,
    normalize,
    score,
)
from asyncrl.rewards.local_rm import LocalRewardModel

__all__ = [
    "REWARD_MODELS",
    "TOTAL",
    "HttpRewardModel",
    "LocalRewardModel",
    "NonFiniteReward",
    "RewardFn",
    "RewardModelUnavailable",
    "RewardResult",
    "RewardScorer",
    "RewardTerm",
    "RewardTimeout",
    "arithmetic_reward",
    "batched",
    "build_reward_fn",
    "build_scorer",
    "code_reward",
    "evaluate",
    "format_reward",
    "is_batched",
    "last_boxed",
    "last_number_text",
    "load_reward_fn",
    "math_reward",
    "normalize",
    "parse_answer",
    "score",
]
