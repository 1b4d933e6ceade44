"""The tiny job with a trainer pool of two data-parallel ranks (`resources.pools`), checkpointed and resumed:
both ranks run (processes.json, memory metrics), every step trains one global batch, every sample once, and the
resumed ranks load the checkpoint both wrote."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.e2e.runs import asyncrl, read_jsonl

pytestmark = pytest.mark.slow

POOLS = "resources.pools=[{name: trainers, role: trainer, count: 2, cpus: 1}, {name: rollouts, role: rollout, cpus: 1}]"
SAMPLES = 8  # configs/tiny.yaml: 2 prompts x 4 samples per step


def test_two_trainer_ranks_train_checkpoint_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = asyncrl("train", "configs/tiny.yaml", "--quiet", "run.steps=4", "run.checkpoint_every=2",
                    f"run.dir={run_dir}", POOLS, timeout=400)  # fmt: skip
    assert first.returncode == 0, first.stderr[-4000:]
    assert {"trainer-0", "trainer-1", "rollout-0"} <= set(json.loads((run_dir / "processes.json").read_text()))
    checkpoint = run_dir / "checkpoints" / "step-000004"
    inspect = asyncrl("ckpt", "inspect", str(checkpoint), timeout=60)
    assert inspect.returncode == 0 and "all match their checksums" in inspect.stdout, inspect.stderr
    resumed = asyncrl("ckpt", "resume", str(checkpoint), "--quiet", "run.steps=6", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"trainer-0", "trainer-1"} <= set(m["rss_mb"]) for m in metrics)
    assert Counter(row["trained_at_version"] for row in ledger) == {v: SAMPLES for v in range(6)}
    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids))  # every sample trained once, across the ranks and the resume
