"""RL objectives on plain tensors: advantage estimators, policy losses, token log-probs.

Pure torch, no DeepSpeed and no model: the trainer calls these on its micro-batches and the
unit tests call them on hand-made tensors. One module per estimator or loss; ``registry``
names them for the config. Shapes: ``B`` samples, ``L`` positions (prompt and response,
right-padded), ``V`` vocabulary.

The names below load on first use (PEP 562), so ``asyncrl.config`` can import the torch-free
``registry`` without pulling torch in through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "grpo_advantages": "asyncrl.algorithms.grpo",
    "ppo_clip_loss": "asyncrl.algorithms.ppo_clip",
    "sequence_logprobs": "asyncrl.algorithms.logprobs",
    "LossInputs": "asyncrl.algorithms.loss",
    "LossConfig": "asyncrl.algorithms.loss",
    "get_advantage": "asyncrl.algorithms.registry",
    "get_policy_loss": "asyncrl.algorithms.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
