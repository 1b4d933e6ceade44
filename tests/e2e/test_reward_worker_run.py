"""A tiny run whose reward is a local sequence-classification model served by a reward worker of its own."""

import math

import pytest

from tests.e2e.runs import train_tiny
from tests.unit.test_reward_models import _write_reward_model


@pytest.mark.slow
def test_a_run_scores_with_the_reward_model_on_its_reward_worker(tmp_path):
    pytest.importorskip("transformers")
    folder = _write_reward_model(tmp_path / "rm")
    run_dir = tmp_path / "rm-run"
    _, ledger = train_tiny(
        run_dir, "run.steps=1", "reward.fn=local_rm", f"reward.local_rm.path={folder}", "reward.local_rm.worker=true"
    )
    assert len(ledger) == 8 and not any(row["reward_failed"] for row in ledger)
    rewards = [row["reward"] for row in ledger]
    assert all(math.isfinite(r) for r in rewards) and len(set(rewards)) > 1  # the model's logits, per response
