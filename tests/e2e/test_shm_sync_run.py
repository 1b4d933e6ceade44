"""The tiny job with `sync.transport=shm`: the trainer writes every bucket into the engine's shared-memory
staging through the Ray actors' real link, the engines switch with staged updates, and later samples are
drawn by the new versions."""

import os

import pytest

from asyncrl.sync.shm_transport import shm_dir
from tests.e2e.runs import train_tiny


@pytest.mark.slow
def test_three_steps_synced_over_shared_memory(tmp_path):
    before = set(os.listdir(shm_dir()))
    metrics, ledger = train_tiny(
        tmp_path / "run", "run.name=shm-sync", "run.steps=3", "sync.transport=shm", "sync.bucket_mb=0.25"
    )
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    assert all(m["sync_seconds"] > 0 for m in metrics)
    assert max(row["version_end"] for row in ledger) >= 1  # samples drawn after a sync used the new weights
    left = {name for name in set(os.listdir(shm_dir())) - before if name.startswith("asyncrl-sync-shm-sync")}
    assert not left, left  # every staging file was unlinked once the trainer mapped it
