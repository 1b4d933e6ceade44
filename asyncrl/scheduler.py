"""The staleness contract (DESIGN §5): one definition, enforced in two places.

staleness(sample) = trainer version when the sample enters an optimizer step - version_start.

1. Admission (here): a prompt group may be issued only while the groups issued and not yet
   trained or dropped fit in ``max_staleness + 1`` global batches ahead of the trainer.
2. Consumption (``is_stale``, called by the trainer): a group over the bound is dropped, or
   its prompt is issued again, and counted.

``max_staleness = 0`` is synchronous on-policy training.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from asyncrl.config import SchedulerConfig


def staleness(trainer_version: int, version_start: int) -> int:
    return trainer_version - version_start


def is_stale(trainer_version: int, version_start: int, max_staleness: int) -> bool:
    return staleness(trainer_version, version_start) > max_staleness


@dataclass
class Scheduler:
    """Admission control over prompt groups; the controller asks it how many groups to issue.

    It consumes: the trainer's version after each step, and the groups the trainer trained or
    dropped. It never issues a group that could only be trained past the staleness bound if
    groups were trained in issue order; the trainer's consumption check makes the bound hard.
    """

    cfg: SchedulerConfig
    prompts_per_step: int
    version: int = 0
    issued: int = 0
    trained: int = 0
    dropped: int = 0
    engine_version: int = 0  # the weights the rollout engines hold
    syncs: int = 0  # weight updates sent to the engines
    blocked: int = 0  # driver polls where admission issued nothing while a rollout worker had no request
    next_prompt: int = 0
    requeued: deque[int] = field(default_factory=deque)
    staleness_counts: Counter = field(default_factory=Counter)
    outstanding: set[int] = field(default_factory=set)
    """Prompt indices issued and neither trained nor dropped: what a checkpoint must issue again on resume."""

    def admissible(self) -> int:
        """Groups that may be issued now: up to ``max_staleness + 1`` global batches ahead of the weights the
        groups will be generated with (the trainer's version; the engines' with ``scheduler.sync=deferred``)."""
        base = self.engine_version if self.cfg.sync == "deferred" else self.version
        window = (base + self.cfg.max_staleness + 1) * self.prompts_per_step
        in_flight_or_done = self.issued - self.dropped
        return max(0, window - in_flight_or_done)

    def take(self, count: int) -> list[int]:
        """Prompt indices to issue (re-issued prompts first); ``count`` must be admissible."""
        assert count <= self.admissible(), "admission control violated"
        picked = []
        while len(picked) < count:
            if self.requeued:
                picked.append(self.requeued.popleft())
            else:
                picked.append(self.next_prompt)
                self.next_prompt += 1
        self.issued += count
        self.outstanding.update(picked)
        return picked

    def on_dropped(self, prompt_indices: list[int]) -> None:
        """The trainer dropped these stale groups, or a stage set them aside: free their admission slots, maybe
        issue them again. A prompt reported twice (two stages raised on its entry) counts once."""
        fresh = [index for index in dict.fromkeys(prompt_indices) if index in self.outstanding]
        self.dropped += len(fresh)
        self.outstanding.difference_update(fresh)
        if self.cfg.on_stale == "regenerate":
            self.requeued.extend(fresh)

    @classmethod
    def starting_at(cls, cfg: SchedulerConfig, prompts_per_step: int, version: int) -> Scheduler:
        """A scheduler for workers already at ``version`` (engines synced to it, nothing in flight), issuing
        prompts from index 0 again: ``asyncrl bench pipeline`` runs each bound on the same workers."""
        done = version * prompts_per_step
        return cls(cfg, prompts_per_step, version=version, issued=done, trained=done, engine_version=version)

    @classmethod
    def from_state(
        cls, cfg: SchedulerConfig, prompts_per_step: int, state: dict, kept: Iterable[int] = ()
    ) -> Scheduler:
        """The scheduler of a checkpoint (``asyncrl.checkpoint.scheduler_state``) on a pipeline with nothing in
        flight but the groups of the prompts ``kept`` (put back from the checkpoint): the other prompts
        outstanding at the checkpoint are no longer issued and go first in the re-issue queue, so none is lost,
        none is trained twice and admission counts as it did then."""
        saved = {int(index) for index in state["outstanding"]}
        still = saved & {int(index) for index in kept}
        outstanding = sorted(saved - still)
        rebuilt = ("prompts_per_step", "issued", "outstanding", "requeued", "staleness_counts")
        return cls(
            cfg,
            prompts_per_step,
            **{key: value for key, value in state.items() if key not in rebuilt},
            issued=state["issued"] - len(outstanding),
            outstanding=still,
            requeued=deque([*outstanding, *state["requeued"]]),
            staleness_counts=Counter({int(key): count for key, count in state["staleness_counts"].items()}),
        )

    def should_sync(self) -> bool:
        """Whether to send the weights now that the trainer is at ``version`` and the engines hold
        ``engine_version``. ``every_step``: always. ``deferred`` (AsyncFlow's deferred parameter update):
        only once the engines are ``max_staleness`` versions behind; one more step without an update
        would close admission (which counts from the engines' version) entirely. So the engines are never
        more than ``max_staleness - 1`` versions behind after this call, a group issued at engine version
        e is trained by version e + max_staleness when groups finish in issue order, and
        ``max_staleness <= 1`` syncs every step."""
        if self.cfg.sync == "every_step":
            return True
        return self.version - self.engine_version >= self.cfg.max_staleness

    def on_synced(self) -> None:
        """The engines now hold the trainer's weights."""
        self.engine_version = self.version
        self.syncs += 1

    def on_step(self, trained_groups: int, staleness_values: list[int], trained_prompts: Iterable[int] = ()) -> None:
        """An optimizer step finished (its groups of the prompt indices ``trained_prompts``): the version moves on
        and admission opens by one batch."""
        self.trained += trained_groups
        self.outstanding.difference_update(trained_prompts)
        self.version += 1
        self.staleness_counts.update(staleness_values)
