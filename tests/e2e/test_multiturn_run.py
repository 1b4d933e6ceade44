"""A real multi-turn run on the tiny model with the built-in calculator environment (rollout.env=calculator)."""

import pytest

from tests.e2e.runs import train_tiny


@pytest.mark.slow
def test_calculator_episodes_take_several_turns_and_train_only_the_sampled_tokens(tmp_path):
    """The random tiny model never writes `CALC:` or `ANSWER:`, so every turn earns the calculator's format
    reminder (an observation) and episodes run to rollout.max_turns; the trainer trains only the sampled tokens."""
    run_dir = tmp_path / "turns"
    metrics, ledger = train_tiny(
        run_dir, "run.steps=2", "rollout.env=calculator", "rollout.max_turns=3", "rollout.max_new_tokens=8"
    )
    assert [m["policy_version"] for m in metrics] == [1, 2]  # it trained
    assert len({row["sample_id"] for row in ledger}) == len(ledger) == 2 * 8
    assert all(1 <= row["turns"] <= 3 for row in ledger)
    several = [row for row in ledger if row["turns"] > 1]
    assert several, "no episode took a second turn"
    # Every turn after the first follows an observation; an observation's tokens are never trained.
    assert all(row["observation_tokens"] >= row["turns"] - 1 for row in ledger)
    assert all(row["reward"] == 0.0 and not row["reward_failed"] for row in ledger)  # no `ANSWER:` line
    for version, record in enumerate(metrics):
        rows = [row for row in ledger if row["trained_at_version"] == version]
        # The trainer's token count is the loss-masked one: the sampled tokens, without the observations.
        trained = sum(row["trained_tokens"] for row in rows)
        assert record["response_tokens_mean"] == pytest.approx(trained / len(rows))
        assert record["turns_mean"] == pytest.approx(sum(row["turns"] for row in rows) / len(rows))
        assert record["observation_tokens_mean"] > 0
        assert record["entropy"] > 0
    assert all(row["version_start"] <= row["version_end"] <= row["trained_at_version"] + 1 for row in ledger)
