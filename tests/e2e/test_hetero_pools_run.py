"""The tiny job with two rollout pools of different dtype and transport: `fp32` (float32, gloo broadcast)
and `half` (float16, the store transport, its own bucket size). The run finishes, the engines' version
advances with every step, and both pools generate trajectories sampled by the synced weights."""

import pytest

from tests.e2e.runs import train_tiny

POOLS = (
    "resources.pools=[{name: trainers, role: trainer, cpus: 1}, {name: fp32, role: rollout, cpus: 1}, "
    "{name: half, role: rollout, cpus: 1, dtype: float16, sync_transport: store, sync_bucket_mb: 0.1}]"
)


@pytest.mark.slow
def test_two_rollout_pools_of_different_dtype_and_transport_train(tmp_path):
    metrics, ledger = train_tiny(
        tmp_path / "run", "run.name=hetero", "run.steps=4", "sync.transport=broadcast", "sync.bucket_mb=0.25", POOLS
    )
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["engine_version"] for m in metrics] == [1, 2, 3, 4]
    # rollout-0 is the fp32 pool's engine, rollout-1 the float16 pool's (placement lays them out pool by pool).
    workers = {row["worker_id"] for row in ledger}
    assert workers == {"rollout-0", "rollout-1"}, workers
    for worker in workers:  # each pool trained on samples of weights that reached it by its own link
        assert max(row["version_start"] for row in ledger if row["worker_id"] == worker) >= 1, worker
