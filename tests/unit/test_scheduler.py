"""The staleness contract as a property: whatever order groups finish in, no trained group is
over the bound, no group is trained twice, and every issued group is accounted for."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.config import SchedulerConfig
from asyncrl.scheduler import Scheduler, is_stale, staleness


def simulate(
    max_staleness: int,
    prompts_per_step: int,
    steps: int,
    seed: int,
    on_stale: str = "drop",
    sync: str = "every_step",
    in_order: bool = False,
):
    """Rollouts start each issued group at the engines' version and finish groups in random order
    (``in_order``: oldest first); the trainer takes whole groups as they finish and drops those over
    the bound (the same rule the TrainerWorker applies); after each step the weights go to the engines
    when ``Scheduler.should_sync`` says so (as the controller does)."""
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_staleness=max_staleness, on_stale=on_stale, sync=sync)
    sched = Scheduler(cfg, prompts_per_step)
    running: list[tuple[int, int]] = []  # (group index, version_start)
    finished: list[tuple[int, int]] = []
    trained, dropped, issued = [], [], []
    for _ in range(steps):
        got = []
        while len(got) < prompts_per_step:
            for prompt in sched.take(sched.admissible()):
                issued.append(prompt)
                running.append((len(issued) - 1, sched.engine_version))
            if not in_order:
                rng.shuffle(running)
            done = rng.randint(1, max(1, len(running)))
            finished.extend(running[:done])
            del running[:done]
            while finished and len(got) < prompts_per_step:
                group = finished.pop(0 if in_order else rng.randrange(len(finished)))
                if is_stale(sched.version, group[1], max_staleness):
                    dropped.append(group)
                    sched.on_dropped([issued[group[0]]])
                else:
                    got.append(group)
        trained.extend((g, staleness(sched.version, start)) for g, start in got)
        sched.on_step(len(got), [s for _, s in trained[-len(got) :]])
        if sched.should_sync():
            sched.on_synced()
        assert sched.version - sched.engine_version <= max(0, max_staleness - 1)  # engines never run past the bound
    return sched, trained, dropped, running + finished, issued


@settings(max_examples=60, deadline=None)
@given(
    max_staleness=st.integers(0, 3),
    prompts_per_step=st.integers(1, 6),
    steps=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    on_stale=st.sampled_from(["drop", "regenerate"]),
    sync=st.sampled_from(["every_step", "deferred"]),
)
def test_bound_holds_and_nothing_is_lost_or_trained_twice(max_staleness, prompts_per_step, steps, seed, on_stale, sync):
    sched, trained, dropped, in_flight, issued = simulate(max_staleness, prompts_per_step, steps, seed, on_stale, sync)
    assert all(s <= max_staleness for _, s in trained)
    groups = [g for g, _ in trained]
    assert len(groups) == len(set(groups)) == steps * prompts_per_step
    accounted = sorted(groups + [g for g, _ in dropped] + [g for g, _ in in_flight])
    assert accounted == list(range(len(issued)))
    assert sched.issued - sched.dropped - sched.trained <= (max_staleness + 1) * prompts_per_step


def test_synchronous_when_bound_is_zero():
    sched, trained, dropped, _, issued = simulate(0, 4, 5, seed=1)
    assert not dropped and len(issued) == 20
    assert all(s == 0 for _, s in trained)


def test_admission_window():
    sched = Scheduler(SchedulerConfig(max_staleness=2), prompts_per_step=3)
    assert sched.admissible() == 9
    sched.take(9)
    assert sched.admissible() == 0
    sched.on_step(3, [0, 0, 0])
    assert sched.admissible() == 3
    sched.on_dropped([4])
    assert sched.admissible() == 4


def test_regenerate_reissues_the_dropped_prompt_first():
    sched = Scheduler(SchedulerConfig(max_staleness=0, on_stale="regenerate"), prompts_per_step=2)
    assert sched.take(2) == [0, 1]
    sched.on_dropped([1])
    assert sched.take(1) == [1]
    drop = Scheduler(SchedulerConfig(max_staleness=0, on_stale="drop"), prompts_per_step=2)
    drop.take(2)
    drop.on_dropped([1])
    assert drop.take(1) == [2]


def test_deferred_sync_skips_updates_within_the_bound():
    """k=2: the weights go out every other step; in issue order nothing is ever dropped."""
    sched, trained, dropped, _, _ = simulate(2, 3, 8, seed=0, sync="deferred", in_order=True)
    assert sched.syncs == 4 and not dropped
    assert max(s for _, s in trained) == 2
    every, _, _, _, _ = simulate(2, 3, 8, seed=0, in_order=True)
    assert every.syncs == 8
    for bound in (0, 1):
        tight, _, tight_dropped, _, _ = simulate(bound, 3, 5, seed=0, sync="deferred", in_order=True)
        assert tight.syncs == 5 and not tight_dropped


def test_deferred_admission_counts_from_the_engines_version():
    sched = Scheduler(SchedulerConfig(max_staleness=2, sync="deferred"), prompts_per_step=2)
    sched.take(6)
    sched.on_step(2, [0, 0])
    assert not sched.should_sync() and sched.admissible() == 0  # the engines are still at version 0
    sched.on_step(2, [1, 1])
    assert sched.should_sync()
    sched.on_synced()
    assert sched.admissible() == 4


def test_starting_at_a_version_opens_the_same_window_as_a_fresh_start():
    fresh = Scheduler(SchedulerConfig(max_staleness=1), prompts_per_step=4)
    later = Scheduler.starting_at(SchedulerConfig(max_staleness=1), prompts_per_step=4, version=7)
    assert later.admissible() == fresh.admissible() == 8
    assert later.take(2) == [0, 1] and later.engine_version == 7


def test_lognormal_budgets_are_seeded_clipped_and_long_tailed():
    from asyncrl.config import ConfigError, RolloutConfig
    from asyncrl.lengths import length_budget

    rc = RolloutConfig(length_dist="lognormal", length_median=8, length_sigma=1.0, max_new_tokens=96)
    budgets = [length_budget(rc, 0, f"p{i}") for i in range(2000)]
    assert budgets == [length_budget(rc, 0, f"p{i}") for i in range(2000)]  # same prompt, same budget
    assert budgets != [length_budget(rc, 1, f"p{i}") for i in range(2000)]  # the run seed changes them
    assert min(budgets) >= 1 and max(budgets) == 96
    ordered = sorted(budgets)
    assert 6 <= ordered[1000] <= 10 and ordered[1980] >= 5 * ordered[1000]  # median ~8, a 99th percentile 5x it
    fixed = RolloutConfig(max_new_tokens=20)
    assert {length_budget(fixed, 0, f"p{i}") for i in range(50)} == {20}
    with pytest.raises(ConfigError, match=r"rollout\.length_dist must be one of fixed, lognormal"):
        RolloutConfig(length_dist="pareto")
