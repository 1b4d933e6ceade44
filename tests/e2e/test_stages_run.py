"""A tiny run whose rewards and reference log-probs come from stage workers of their own (``stages.*``)."""

import math

import pytest

from tests.e2e.runs import train_tiny


@pytest.mark.slow
def test_a_run_with_reward_and_reference_stages_trains_every_sample_once_with_the_kl_term(tmp_path):
    metrics, ledger = train_tiny(
        tmp_path / "staged",
        "run.steps=2",
        "stages.reward=true",
        "stages.reward_workers=2",
        "stages.reference=true",
        "trainer.kl_coef=0.1",
    )
    samples = 2 * 8  # tiny: 2 prompts per step, 4 samples each
    assert len(ledger) == samples and len({row["sample_id"] for row in ledger}) == samples
    assert all(math.isfinite(row["reward"]) and not row["reward_failed"] for row in ledger)
    assert [m["step"] for m in metrics] == [1, 2]
    last = metrics[-1]
    # Both stages handed on what was trained (and may be ahead of the trainer by the staleness bound).
    assert last["reward_stage_rows"] >= samples and last["reference_stage_rows"] >= samples
    assert last["reward_stage_busy_s"] > 0 and last["reference_stage_busy_s"] > 0
    # The KL term ran: before any update the policy is the reference, so KL is ~0 at the first step.
    assert all("kl_ref" in m for m in metrics)
    assert abs(metrics[0]["kl_ref"]) < 1e-3
