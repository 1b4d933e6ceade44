"""A real 3-step asynchronous run on the tiny model: vLLM, DeepSpeed, Redis and Ray all real."""

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.runs import ROOT, asyncrl, train_tiny

REQUIRED = {
    "step", "policy_version", "reward_mean", "staleness_max", "samples_trained",
    "rollout_tokens_per_s", "train_tokens_per_s", "sync_seconds", "step_seconds", "entropy",
}  # fmt: skip


@pytest.mark.slow
def test_three_steps_with_staleness_one(tmp_path):
    run_dir = tmp_path / "run"
    metrics, ledger = train_tiny(
        run_dir, "run.steps=3", "scheduler.max_staleness=1", "store.rows_per_message=8", "store.appendonly=true",
        "run.checkpoint_every=2",
    )  # fmt: skip

    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    assert all(REQUIRED <= m.keys() for m in metrics)
    assert all(m["samples_trained"] == 8 for m in metrics)
    assert all(m["entropy"] > 0 for m in metrics)  # a sampling policy, not a point mass
    assert sum(metrics[-1]["staleness_hist"].values()) == 24 and set(metrics[-1]["staleness_hist"]) <= {"0", "1"}
    # Resident memory of every process kind, so users can size machines.
    for record in metrics:
        for key in ("rss_mb", "rss_peak_mb"):
            assert set(record[key]) == {"driver", "trainer-0", "rollout-0", "redis", "ray"}, record[key]
            assert all(mb > 0 for mb in record[key].values()), record[key]
        assert all(record["rss_mb"][role] <= record["rss_peak_mb"][role] for role in record["rss_mb"])

    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids)) == 3 * 8  # every sample trained exactly once
    assert all(0 <= row["trained_at_version"] - row["version_start"] <= 1 for row in ledger)
    assert all(row["version_start"] <= row["version_end"] for row in ledger)
    assert sorted({row["trained_at_version"] for row in ledger}) == [0, 1, 2]
    assert (run_dir / "reward.png").stat().st_size > 0
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").iterdir())
    # The embedded redis-server (its log lines start with its pid) was stopped with the run.
    server_pid = int((run_dir / "redis" / "redis.log").read_text().split(":", 1)[0])
    assert not Path(f"/proc/{server_pid}").exists()
    # Two groups per Arrow message, none lost to the dead-letter stream; the AOF it left is inspectable.
    assert all(m["store_dead_letters"] == 0 for m in metrics)
    stats = asyncrl("store", "stats", str(run_dir), timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert "AOF data" in stats.stdout and "trajectories" in stats.stdout
    # Checkpoints after step 2 (run.checkpoint_every) and after the last step, each intact.
    listed = asyncrl("ckpt", "list", str(run_dir), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["2", "2"], ["3", "3"]]
    last = run_dir / "checkpoints" / "step-000003"
    assert any(last.glob("engine/*optim_states.pt")), sorted(str(p.relative_to(last)) for p in last.rglob("*"))
    assert (last / "hf_config" / "config.json").is_file()
    state = json.loads((last / "run_state.json").read_text())
    assert state["scheduler"]["version"] == 3 and sum(state["scheduler"]["staleness_counts"].values()) == 24
    inspect = asyncrl("ckpt", "inspect", str(last), timeout=60)
    assert inspect.returncode == 0 and "all match" in inspect.stdout, inspect.stdout + inspect.stderr
    _check_export(last, tmp_path / "exported")


def _check_export(checkpoint: Path, out: Path) -> None:
    """`ckpt export-hf` writes the trained policy (not the base model) as a folder transformers loads;
    a truncated checkpoint file is refused by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncrl.models import resolve_model_path

    done = asyncrl("ckpt", "export-hf", str(checkpoint), str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    engine_state = torch.load(next(checkpoint.glob("engine/mp_rank_*_model_states.pt")), weights_only=False)
    # The engine state after the run's 3 optimizer steps (the tiny random model earns no reward, so its
    # gradients are zero and the weights equal the base: the step count is what shows the state is the run's).
    assert engine_state["global_steps"] == 3 and "torch_rng_state" in engine_state
    assert all(torch.equal(exported[name], tensor) for name, tensor in engine_state["module"].items())
    assert AutoTokenizer.from_pretrained(out).encode("1+2=") == AutoTokenizer.from_pretrained(
        resolve_model_path("tiny-qwen2")
    ).encode("1+2=")
    states = next(checkpoint.glob("engine/*optim_states.pt"))
    states.write_bytes(states.read_bytes()[:64])
    refused = asyncrl("ckpt", "export-hf", str(checkpoint), str(out) + "-2", timeout=120)
    assert refused.returncode == 2 and states.name in refused.stderr, refused.stderr[-2000:]


@pytest.mark.slow
def test_synchronous_run_with_two_rollout_workers(tmp_path):
    """k = 0 is on-policy: every sample is trained at the version that sampled it, across two engines."""
    run_dir = tmp_path / "sync"
    _, ledger = train_tiny(
        run_dir, "run.steps=2", "scheduler.max_staleness=0", "rollout.num_workers=2", "scheduler.on_stale=regenerate"
    )
    assert len({row["sample_id"] for row in ledger}) == len(ledger) == 2 * 8
    assert all(row["trained_at_version"] == row["version_start"] == row["version_end"] for row in ledger)


@pytest.mark.slow
def test_failing_reward_marks_samples_failed_and_the_run_goes_on(tmp_path):
    """A user's reward file outside the package, named by path, that raises or returns NaN on some samples.

    Those samples are counted failed and none is lost; its dict's other entry is recorded as a component.
    """
    user_file = tmp_path / "elsewhere" / "my_rewards.py"
    user_file.parent.mkdir()
    shutil.copy(ROOT / "tests" / "e2e" / "flaky_reward.py", user_file)
    run_dir = tmp_path / "flaky"
    metrics, ledger = train_tiny(run_dir, "run.steps=2", f"reward.fn={user_file}:flaky_components")
    assert len({row["sample_id"] for row in ledger}) == len(ledger) == 2 * 8
    failed = [row for row in ledger if row["reward_failed"]]
    assert failed and len(failed) < len(ledger)  # the tiny model's responses vary in length
    assert sum(m["reward_failed"] for m in metrics) == len(failed)
    # Counted by kind: even lengths raise RuntimeError, the rest of the failures are NaN (NonFiniteReward).
    assert {row["reward_error"] for row in failed} <= {"RuntimeError", "NonFiniteReward"}
    assert all(row["reward_error"] is None for row in ledger if not row["reward_failed"])
    for kind in ("RuntimeError", "NonFiniteReward"):
        by_kind = sum(m.get(f"reward_failed_by/{kind}", 0) for m in metrics)
        assert by_kind == sum(row["reward_error"] == kind for row in failed)
    assert all(m["reward_failed"] == sum(v for k, v in m.items() if k.startswith("reward_failed_by/")) for m in metrics)
    # Failed samples do not drag the mean (a step whose 8 samples all failed, p = (2/3)^8, has none to average).
    scored = {row["trained_at_version"] for row in ledger if not row["reward_failed"]}
    assert scored and all(m["reward_mean"] == 1.0 for version, m in enumerate(metrics) if version in scored)
    assert all(row["reward_components"] == {} for row in failed)
    assert all(set(row["reward_components"]) == {"length"} for row in ledger if not row["reward_failed"])
    for version, record in enumerate(metrics):  # per-component means over the step's samples that computed them
        rows = [row for row in ledger if row["trained_at_version"] == version and not row["reward_failed"]]
        assert ("reward/length" in record) == bool(rows)
        if rows:
            mean = sum(row["reward_components"]["length"] for row in rows) / len(rows)
            assert record["reward/length"] == pytest.approx(mean)
