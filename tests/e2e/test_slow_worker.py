"""Load balance on the tiny model: one rollout worker 5x slower than the other must not stall the run.

Each worker's speed is set by ``rollout.debug_token_delay_s`` (a sleep per sampled token, so its decode rate is about
1/delay tokens/s whatever its batch): 10 ms for rollout-0, 50 ms for rollout-1. A worker's capacity is measured from
its own counters (``rollout_decode_by_worker``: tokens sampled / seconds spent stepping, between the end of step 1
and the end of the run), so the compute cost of the tiny model on a loaded machine is included.

``scheduler.max_staleness=6``: with ``rollout.inflight_budget_s=1`` the slow worker holds about one group at a time,
and that group's 64 tokens take it ~3.5 s, during which the run makes ~4 optimizer steps; 6 leaves room so its
groups are trained, not dropped (the test checks none is). Step 1 is left out of the rates: it starts on an empty
pipeline (the trainer waits for the very first groups, the workers for the first prompts).
"""

import pytest

from tests.e2e.runs import train_tiny

DELAYS = (0.01, 0.05)  # seconds per sampled token: rollout-1 is 5x slower
STEPS = 12


@pytest.mark.slow
def test_a_5x_slower_worker_gets_proportionally_less_work_and_the_fast_one_never_waits(tmp_path):
    metrics, ledger = train_tiny(
        tmp_path / "slow-worker",
        f"run.steps={STEPS}",
        "rollout.num_workers=2",
        f"rollout.debug_token_delay_s=[{DELAYS[0]},{DELAYS[1]}]",
        "rollout.inflight_budget_s=1.0",
        "scheduler.max_staleness=6",
    )
    first, last = metrics[0]["rollout_decode_by_worker"], metrics[-1]["rollout_decode_by_worker"]
    capacity = {  # tokens/s while the worker had requests, from its own counters
        name: (last[name]["tokens"] - first[name]["tokens"])
        / (last[name]["busy_seconds"] - first[name]["busy_seconds"])
        for name in ("rollout-0", "rollout-1")
    }
    for name, delay in zip(capacity, DELAYS, strict=True):
        assert capacity[name] >= 0.6 / delay, f"{name} decodes at {capacity[name]:.1f} tokens/s, delay {delay} s/token"
    assert 3.5 <= capacity["rollout-0"] / capacity["rollout-1"] <= 5.5, capacity

    steady = metrics[1:]
    fast_idle = [m["rollout_idle_fraction_by_worker"]["rollout-0"] for m in steady]
    assert max(fast_idle) < 0.10, f"the fast worker waited: idle fractions {fast_idle}"

    samples = sum(m["samples_trained"] for m in steady)
    tokens = sum(m["response_tokens_mean"] * m["samples_trained"] for m in steady)
    samples_per_s = samples / sum(m["step_seconds"] for m in steady)
    capacity_samples_per_s = sum(capacity.values()) / (tokens / samples)
    assert samples_per_s >= 0.9 * capacity_samples_per_s, (
        f"trained {samples_per_s:.2f} samples/s, the workers' combined capacity is {capacity_samples_per_s:.2f} "
        f"({capacity})"
    )

    # Every sample trained once, none dropped or past the bound, and the slow worker's share follows its capacity
    # (a worker that filled its engine regardless would hold as many groups as the fast one and see them go stale).
    assert len(ledger) == STEPS * 8 and len({row["sample_id"] for row in ledger}) == len(ledger)
    assert sum(m["dropped"] for m in metrics) == 0
    assert all(row["trained_at_version"] - row["version_start"] <= 6 for row in ledger)
    slow_share = sum(row["worker_id"] == "rollout-1" for row in ledger) / len(ledger)
    capacity_share = capacity["rollout-1"] / sum(capacity.values())
    assert 0.5 * capacity_share <= slow_share <= 1.5 * capacity_share, (slow_share, capacity_share)
