"""The scheduler in a real run on the tiny model: deferred weight sync and the per-step scheduler metrics."""

import pytest

from tests.e2e.runs import train_tiny


@pytest.mark.slow
def test_deferred_sync_updates_the_engines_every_other_step_within_the_bound(tmp_path):
    """k=2 with scheduler.sync=deferred: weights go out after steps 2, 4, 6 only, no sample is trained past
    the bound, and every step reports admitted/blocked/dropped counts and idle fractions in [0, 1]."""
    run_dir = tmp_path / "deferred"
    metrics, ledger = train_tiny(
        run_dir, "run.steps=6", "scheduler.max_staleness=2", "scheduler.sync=deferred", "rollout.length_dist=lognormal"
    )
    assert [m["engine_version"] for m in metrics] == [0, 2, 2, 4, 4, 6]
    assert [m["sync_seconds"] > 0 for m in metrics] == [False, True, False, True, False, True]
    assert len(ledger) == 6 * 8 and len({row["sample_id"] for row in ledger}) == len(ledger)
    assert all(row["trained_at_version"] - row["version_start"] <= 2 for row in ledger)
    admitted = sum(m["admitted"] for m in metrics)
    assert admitted >= 6 * 2 and admitted - sum(m["dropped"] for m in metrics) <= (6 + 2 + 1) * 2
    for m in metrics:
        assert m["blocked"] >= 0 and m["dropped"] >= 0
        assert 0 <= m["trainer_idle_fraction"] <= 1 and 0 <= m["rollout_idle_fraction"] <= 1
        assert set(m["rollout_idle_fraction_by_worker"]) == {"rollout-0"}
