"""Every advantage estimator, policy loss, loss aggregation and KL estimator, chosen by name.

The tables map a config name to ``module:function``. They hold strings, not functions, so this
module (and ``asyncrl.config``, which validates names against it) imports no torch: the CLI
checks ``trainer.advantage=...`` before anything heavy loads. A getter imports the one module
it names. Adding an estimator or loss is a new module plus one line here and its contract test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

ADVANTAGES: dict[str, str] = {
    "grpo": "asyncrl.algorithms.grpo:grpo_advantages",
    "dr_grpo": "asyncrl.algorithms.dr_grpo:dr_grpo_advantages",
    "rloo": "asyncrl.algorithms.rloo:rloo_advantages",
    "reinforce_pp": "asyncrl.algorithms.reinforce_pp:reinforce_pp_advantages",
}
"""Estimators ``(rewards [B], group_index [B]) -> advantages [B]``."""

BATCH_SCOPED_ADVANTAGES: frozenset[str] = frozenset({"reinforce_pp"})
"""Estimators whose statistics span the step's whole batch, so the trainer must hold every group
of the step before scoring any; the others need one group at a time."""

POLICY_LOSSES: dict[str, str] = {
    "ppo_clip": "asyncrl.algorithms.ppo_clip:ppo_clip",
    "decoupled_ppo": "asyncrl.algorithms.decoupled_ppo:decoupled_ppo",
    "tis": "asyncrl.algorithms.tis:truncated_is",
    "ratio_mask": "asyncrl.algorithms.ratio_mask:ratio_mask",
}
"""Losses ``(LossInputs, LossConfig) -> (loss, metrics)`` (see ``asyncrl.algorithms.loss``)."""

PROXIMAL_LOSSES: frozenset[str] = frozenset({"decoupled_ppo"})
"""Losses that need ``proximal_logprobs``, recomputed by the trainer before the step's update."""

LOSS_AGGREGATIONS: dict[str, str] = {
    "token_mean": "asyncrl.algorithms.aggregation:token_mean",
    "seq_mean_token_sum": "asyncrl.algorithms.aggregation:seq_mean_token_sum",
    "seq_mean_token_mean": "asyncrl.algorithms.aggregation:seq_mean_token_mean",
    "seq_mean_token_sum_norm": "asyncrl.algorithms.aggregation:seq_mean_token_sum_norm",
}
"""Reductions ``(per_token [B, L], mask [B, L], max_response_len) -> scalar loss``."""

KL_ESTIMATORS: dict[str, str] = {
    "k1": "asyncrl.algorithms.kl:kl_k1",
    "k2": "asyncrl.algorithms.kl:kl_k2",
    "k3": "asyncrl.algorithms.kl:kl_k3",
}
"""Per-token estimators ``(logprobs, ref_logprobs, mask) -> [B, L]`` of KL(policy || reference)."""


def _resolve(kind: str, table: Mapping[str, str], name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(table)}")
    module, _, attribute = table[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_advantage(name: str) -> Callable:
    """The advantage estimator registered as ``name``; a ValueError lists the allowed names."""
    return _resolve("advantage estimator", ADVANTAGES, name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name``; a ValueError lists the allowed names."""
    return _resolve("policy loss", POLICY_LOSSES, name)


def get_aggregation(name: str) -> Callable:
    """The loss aggregation registered as ``name``; a ValueError lists the allowed names."""
    return _resolve("loss aggregation", LOSS_AGGREGATIONS, name)


def get_kl_estimator(name: str) -> Callable:
    """The KL estimator registered as ``name``; a ValueError lists the allowed names."""
    return _resolve("KL estimator", KL_ESTIMATORS, name)
