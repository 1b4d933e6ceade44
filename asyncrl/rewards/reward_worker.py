"""The local reward model on a reward worker of its own (``reward.local_rm.worker=true``).

One Ray actor, ``RewardModelWorker``, loads the sequence-classification model once per run; every
rollout worker's ``local_rm`` reward is then a ``RemoteRewardModel`` that sends each batch to it and
waits at most ``reward.local_rm.timeout_s`` (a timeout or a dead worker fails only that batch's samples,
through the reward fault boundary). Without it, each rollout worker loads its own copy in process.

The actor is named ``REWARD_WORKER`` (like the trainer's ``trainer-0``): the driver starts it before the
rollout workers (``start_reward_worker``), which look it up by name. ray is imported only when used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncrl.config import Config, LocalRewardModelConfig

REWARD_WORKER = "reward-model-0"
"""The Ray actor name of the run's reward worker."""

_started: list[Any] = []  # the driver's handles: the worker lives as long as the driver holds one


class RewardModelWorker:
    """A Ray actor that holds one ``LocalRewardModel`` and scores batches for every rollout worker."""

    def __init__(self, cfg: LocalRewardModelConfig) -> None:
        from asyncrl.rewards.local_rm import LocalRewardModel

        self.model = LocalRewardModel.from_config(cfg)

    def ready(self) -> int:
        import os

        return os.getpid()

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        return self.model(prompts, responses, metadata)


class RemoteRewardModel:
    """A batched reward that scores on the run's reward worker."""

    batched = True

    def __init__(self, timeout_s: float) -> None:
        import ray

        self.timeout_s = timeout_s
        self.worker = ray.get_actor(REWARD_WORKER)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[float]:
        import ray

        ref = self.worker.score.remote(list(prompts), list(responses), [dict(m) for m in metadata])
        return ray.get(ref, timeout=self.timeout_s)


def uses_reward_worker(cfg: Config) -> bool:
    """Whether the run's reward includes ``local_rm`` with ``reward.local_rm.worker=true``."""
    specs = [term.fn for term in cfg.reward.fns] if cfg.reward.fns else [cfg.reward.fn]
    return cfg.reward.local_rm.worker and "local_rm" in specs


def start_reward_worker(cfg: Config, timeout_s: float = 300.0) -> Any | None:
    """Start the run's reward worker when ``uses_reward_worker``; returns its handle (None when not used).

    The actor takes no CPU slot of the placement (it waits on requests most of the time) and one GPU when
    ``reward.local_rm.device`` is a CUDA device. Waits up to ``timeout_s`` for the model to load.
    """
    import ray

    if not uses_reward_worker(cfg):
        return None
    rm = cfg.reward.local_rm
    gpus = 1 if rm.device.startswith("cuda") else 0
    worker = ray.remote(RewardModelWorker).options(name=REWARD_WORKER, num_cpus=0, num_gpus=gpus).remote(rm)
    ray.get(worker.ready.remote(), timeout=timeout_s)
    _started.append(worker)
    return worker
