"""A tiny run whose reward is a local sequence-classification model served by a reward worker of its own."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_reward_models import _write_reward_model

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_a_run_scores_with_the_reward_model_on_its_reward_worker(tmp_path):
    pytest.importorskip("transformers")
    folder = _write_reward_model(tmp_path / "rm")
    run_dir = tmp_path / "rm-run"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}",
         "run.steps=1", "reward.fn=local_rm", f"reward.local_rm.path={folder}", "reward.local_rm.worker=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 8 and not any(row["reward_failed"] for row in ledger)
    rewards = [row["reward"] for row in ledger]
    assert all(math.isfinite(r) for r in rewards) and len(set(rewards)) > 1  # the model's logits, per response
