"""Exact resume: a tiny run killed with -9 after its step-4 checkpoint, resumed with a new learning rate,
stopped by SIGTERM (a checkpoint at the next step boundary, exit 143) and resumed again to step 8, against
an uninterrupted 8-step run of the same config: same policy versions, every step logged once, every sample
trained once, and every prompt outstanding at a checkpoint trained after the resume from it."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

from asyncrl.checkpoint import list_checkpoints, read_groups
from asyncrl.data import prompt_index
from tests.e2e.runs import asyncrl, read_jsonl, start_asyncrl, wait_for

pytestmark = pytest.mark.slow

JOB = ("configs/tiny.yaml", "--quiet", "run.steps=8", "reward.fn=tests/e2e/slow_reward.py:slow_reward")
STEPS, SAMPLES, GROUP = 8, 8, 4
RUN_TIMEOUT_S = 300


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _trained_after(ledger: list[dict], version: int) -> set[int]:
    return {prompt_index(row["prompt_id"]) for row in ledger if row["trained_at_version"] >= version}


def test_kill_sigterm_and_resume_match_an_uninterrupted_run(tmp_path):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = start_asyncrl(tmp_path / "reference.log", "train", *JOB, f"run.dir={reference_dir}")
    killed = start_asyncrl(tmp_path / "killed.log", "train", *JOB, f"run.dir={run_dir}", "run.checkpoint_every=2")
    fourth = run_dir / "checkpoints" / "step-000004"
    wait_for("checkpoint step-000004", fourth.is_dir, killed, RUN_TIMEOUT_S)  # renamed into place when complete
    killed.kill()
    killed.wait(timeout=30)
    state_4 = json.loads((fourth / "run_state.json").read_text())["scheduler"]
    kept_4 = {sample for group in read_groups(fourth) for sample in group.column("sample_id").to_pylist()}
    # The embedded redis-server died with the driver (PR_SET_PDEATHSIG), so nothing of the killed run lingers.
    server_pid = json.loads((run_dir / "redis" / "server.json").read_text())["pid"]
    wait_for("the killed run's redis-server to exit", lambda: not _running(server_pid), reference, 10)
    assert reference.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "reference.log").read_text()[-4000:]

    # Refused before anything starts: a changed model or group size, a damaged checkpoint.
    for change, key in (("model.path=other", "model.path"), ("rollout.group_size=8", "rollout.group_size")):
        refused = asyncrl("ckpt", "resume", str(fourth), change, timeout=60)
        assert refused.returncode == 2 and f"{key} cannot change on resume" in refused.stderr, refused.stderr
    damaged = tmp_path / "damaged" / "checkpoints" / fourth.name
    shutil.copytree(fourth, damaged)
    weights = next(damaged.glob("engine/*model_states.pt"))
    weights.write_bytes(weights.read_bytes()[:1000])
    refused = asyncrl("ckpt", "resume", str(damaged), timeout=60)
    assert refused.returncode == 2 and str(weights) in refused.stderr and "truncated" in refused.stderr
    assert not (damaged.parent.parent / "redis").exists()  # nothing started

    # Resume with a new learning rate; SIGTERM once it logged step 5: a checkpoint at the next boundary, 143.
    resumed = start_asyncrl(tmp_path / "resumed.log", "ckpt", "resume", str(fourth), "--quiet", "trainer.lr=5e-4")
    wait_for("step 5 of the resumed run", lambda: _steps_logged(run_dir) >= 5, resumed, RUN_TIMEOUT_S)
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 143, (tmp_path / "resumed.log").read_text()[-4000:]
    stopped = list_checkpoints(run_dir)[-1]
    assert 5 <= stopped.step < STEPS and "stopped by SIGTERM" in (tmp_path / "resumed.log").read_text()
    state_k = json.loads((stopped.path / "run_state.json").read_text())["scheduler"]
    final = asyncrl("ckpt", "resume", str(stopped.path), "--quiet", timeout=RUN_TIMEOUT_S)
    assert final.returncode == 0, final.stderr[-4000:]

    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    ref_metrics, ref_ledger = read_jsonl(reference_dir / "metrics.jsonl"), read_jsonl(reference_dir / "ledger.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # no step counted twice, none missing
    assert [m["policy_version"] for m in metrics] == [m["policy_version"] for m in ref_metrics]
    assert all(m["policy_version"] == m["step"] for m in metrics)  # version == step: the ledger cut is the step's
    assert [m["lr"] for m in metrics] == [1e-4] * 4 + [5e-4] * 4  # the new rate from the first resumed step on
    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids)) == len(ref_ledger) == STEPS * SAMPLES  # every sample trained exactly once
    assert Counter(row["trained_at_version"] for row in ledger) == {v: SAMPLES for v in range(STEPS)}
    # Every prompt trained once (whole groups), as many as without the interruptions.
    per_prompt = Counter(row["prompt_id"] for row in ledger)
    assert set(per_prompt.values()) == {GROUP} and len(per_prompt) == len({r["prompt_id"] for r in ref_ledger})
    # The prompts in flight at each checkpoint were issued again and trained after it, not before.
    for state, version in ((state_4, 4), (state_k, stopped.version)):
        outstanding = set(state["outstanding"])
        assert len(outstanding) == state["issued"] - state["trained"] - state["dropped"]
        assert not outstanding & {prompt_index(r["prompt_id"]) for r in ledger if r["trained_at_version"] < version}
        if STEPS - version >= 2:  # one step may take newer prompts that finished first; two take all of them
            assert outstanding <= _trained_after(ledger, version), (outstanding, _trained_after(ledger, version))
    assert stopped.version == stopped.step
    # run.checkpoint_store=arrow: the scored groups kept at step 4 went back to the store and were trained as they
    # were (the same sample ids), after the resume.
    assert kept_4 <= {row["sample_id"] for row in ledger if row["trained_at_version"] >= 4}
