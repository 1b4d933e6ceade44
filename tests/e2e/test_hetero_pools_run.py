"""The tiny job with two rollout pools of different dtype and transport: `fp32` (float32, gloo broadcast)
and `bf16` (bfloat16, the store transport, its own bucket size). The run finishes, the engines' version
advances with every step, and both pools generate trajectories sampled by the synced weights. An engine of
the bfloat16 pool killed (SIGKILL) or stopped (SIGSTOP) mid-run is restarted and brought back through its own
pool's link while the fp32 pool goes on. A tensor-parallel pool (two vLLM CPU processes) trains on its per-rank
shards."""

import os
import re
import signal

import pytest

from tests.e2e.runs import finish, read_jsonl, run_pids, start_asyncrl, steps_done, train_tiny, wait_for

RUN_TIMEOUT_S = 240

POOLS = (
    "resources.pools=[{name: trainers, role: trainer, cpus: 1}, {name: fp32, role: rollout, cpus: 1}, "
    "{name: bf16, role: rollout, cpus: 1, dtype: bfloat16, sync_transport: store, sync_bucket_mb: 0.1}]"
)


@pytest.mark.slow
def test_two_rollout_pools_of_different_dtype_and_transport_train(tmp_path):
    metrics, ledger = train_tiny(
        tmp_path / "run", "run.name=hetero", "run.steps=4", "sync.transport=broadcast", "sync.bucket_mb=0.25", POOLS
    )
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["engine_version"] for m in metrics] == [1, 2, 3, 4]
    # rollout-0 is the fp32 pool's engine, rollout-1 the bfloat16 pool's (placement lays them out pool by pool).
    workers = {row["worker_id"] for row in ledger}
    assert workers == {"rollout-0", "rollout-1"}, workers
    for worker in workers:  # each pool trained on samples of weights that reached it by its own link
        assert max(row["version_start"] for row in ledger if row["worker_id"] == worker) >= 1, worker


@pytest.mark.slow
def test_a_tensor_parallel_pool_trains_on_its_per_rank_shards(tmp_path):
    pools = "resources.pools=[{name: trainers, role: trainer, cpus: 1}, {name: tp2, role: rollout, cpus: 2, tensor_parallel: 2}]"
    overrides = ("run.name=tp", "run.steps=3", "scheduler.max_staleness=0", "sync.transport=broadcast", pools)
    metrics, ledger = train_tiny(tmp_path / "run", *overrides)
    assert [m["engine_version"] for m in metrics] == [1, 2, 3]
    assert {row["worker_id"] for row in ledger} == {"rollout-0"}
    # k=0: every sample trained at version v was generated whole by the weights of version v, synced shard by shard.
    assert all(row["version_start"] == row["version_end"] == row["trained_at_version"] for row in ledger)
    assert sorted({row["trained_at_version"] for row in ledger}) == [0, 1, 2]


@pytest.mark.slow
def test_a_killed_engine_of_the_bf16_pool_rejoins_by_its_own_pools_link(tmp_path):
    run_dir, steps = tmp_path / "run", 6
    log = tmp_path / "run.log"
    overrides = ("run.name=hetero", f"run.steps={steps}", "sync.transport=broadcast", "sync.bucket_mb=0.25", POOLS)
    proc = start_asyncrl(log, "train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", *overrides)
    try:
        wait_for("the first step", lambda: steps_done(run_dir) >= 1, proc)  # the pools have synced once
        killed_after = steps_done(run_dir)
        pid = run_pids(run_dir)["rollout-1"]
        os.kill(pid, signal.SIGKILL)
        finish(proc, log, RUN_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()[-4000:]
    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["rollout_restarts"] == 1 and run_pids(run_dir)["rollout-1"] != pid
    assert [m["engine_version"] for m in metrics] == list(range(1, steps + 1))
    # The restarted bfloat16 engine got newer weights through the store link of its pool (rebuilt with it).
    newest = max(row["version_start"] for row in ledger if row["worker_id"] == "rollout-1")
    assert newest > killed_after, (newest, killed_after)


@pytest.mark.slow
def test_a_stopped_engine_of_the_bf16_pool_is_caught_restarted_and_resynced_while_the_fp32_pool_goes_on(tmp_path):
    """The bf16 pool's only engine is stopped (SIGSTOP): caught within sync.timeout_s, killed, restarted and
    synced again through its pool's link; an error that names a pool names that one, never the fp32 pool."""
    run_dir, steps, hang_s = tmp_path / "run", 5, 4
    log = tmp_path / "run.log"
    overrides = ("run.name=hetero", f"run.steps={steps}", "sync.transport=broadcast", "sync.bucket_mb=0.25",
                 f"sync.timeout_s={hang_s}", POOLS)  # fmt: skip
    proc = start_asyncrl(log, "train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", *overrides)
    stopped = None
    try:
        wait_for("the first step", lambda: steps_done(run_dir) >= 1, proc)
        stopped = run_pids(run_dir)["rollout-1"]
        os.kill(stopped, signal.SIGSTOP)
        finish(proc, log, RUN_TIMEOUT_S)
    finally:
        proc.kill()
        if stopped is not None:
            try:  # the run should have killed it; it must not stay stopped either way
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    hung = re.search(rf"rollout worker rollout-1 \(pid {stopped}\) hung: (.*); killing it so Ray restarts it", output)
    assert hung, output[-4000:]
    assert "pool fp32" not in hung.group(1) and ("pool " not in hung.group(1) or "pool bf16" in hung.group(1))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["rollout_hangs"] == 1 and metrics[-1]["rollout_restarts"] == 1
    assert [m["engine_version"] for m in metrics] == list(range(1, steps + 1))
    assert run_pids(run_dir)["rollout-1"] != stopped
