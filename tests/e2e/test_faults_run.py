"""A tiny run survives the death of one process, killed by its pid with SIGKILL mid-run.

- A rollout worker: Ray restarts it, the controller syncs it to the current weights and starts it
  again, and it takes back the prompt entries it held; every prompt is still trained exactly once.
- The trainer: the run stops, exit 1, with an error naming the trainer and the newest checkpoint,
  which verifies intact.

The pids come from ``run.dir/processes.json``, which the driver writes from the actors' ``memory()``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from asyncrl.checkpoint import verify
from asyncrl.types import Groups, Streams
from storage import EmbeddedRedis, TrajectoryStore, connect
from tests.e2e.runs import ROOT, read_jsonl

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 240


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """A quiet `asyncrl train configs/tiny.yaml` into ``run_dir``, in the background."""
    args = [sys.executable, "-m", "asyncrl", "train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", *overrides]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(what: str, check: Callable[[], object], proc: subprocess.Popen, timeout_s: float = 180):
    """Poll ``check`` until it returns something truthy; fails if the run exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.01)
    pytest.fail(f"no {what} within {timeout_s}s")


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _pids(run_dir: Path) -> dict[str, int]:
    try:
        return json.loads((run_dir / "processes.json").read_text())
    except (OSError, ValueError):
        return {}


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """The run's exit code and stderr, once it ends (killed if it outlives RUN_TIMEOUT_S)."""
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run did not end within {RUN_TIMEOUT_S}s after the kill:\n{err[-4000:]}")
    return proc.returncode, err


def _every_prompt_trained_once(ledger: list[dict], steps: int, prompts_per_step: int, group_size: int) -> None:
    """With max_staleness 0 each step trains exactly the prompts issued for it, so a lost prompt stalls the
    run and one generated twice shows up here."""
    assert len({row["sample_id"] for row in ledger}) == len(ledger) == steps * prompts_per_step * group_size
    per_prompt = Counter(row["sample_id"].split("-")[0] for row in ledger)
    assert sorted(per_prompt.values()) == [group_size] * (steps * prompts_per_step), per_prompt


def test_a_killed_rollout_worker_is_restarted_and_its_prompts_generated_again(tmp_path: Path) -> None:
    run_dir, steps = tmp_path / "run", 4
    proc = _start(run_dir, f"run.steps={steps}", "scheduler.max_staleness=0")
    try:
        _wait_for("the first step", lambda: _steps_done(run_dir) >= 1, proc)  # a weight sync has happened
        pids = _pids(run_dir)
        url = EmbeddedRedis.running_url(run_dir / "redis")
        store = TrajectoryStore(connect(url, 5.0), "tiny", 5.0)
        # Kill it while it holds a prompt entry it read and has not finished.
        _wait_for("a prompt held", lambda: store.pending(Streams.PROMPTS, Groups.ROLLOUT) > 0, proc)
        os.kill(pids["rollout-0"], signal.SIGKILL)
        store.close()
        code, err = _finish(proc)
    finally:
        proc.kill()
    assert code == 0, err[-4000:]
    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    assert [record["step"] for record in metrics] == list(range(1, steps + 1))
    last = metrics[-1]
    assert last["rollout_restarts"] == 1 and last["prompts_reclaimed"] >= 1
    assert last["dropped_groups"] == 0  # the restarted engine generated with the current weights, not stale ones
    assert last["store_inflight_prompts"] == 0 and last["store_dead_letters"] == 0
    _every_prompt_trained_once(ledger, steps, prompts_per_step=2, group_size=4)
    assert _pids(run_dir)["rollout-0"] != pids["rollout-0"]


def test_a_killed_trainer_stops_the_run_naming_the_checkpoint_to_resume_from(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "run.steps=30", "run.checkpoint_every=1")
    try:
        _wait_for("two steps", lambda: _steps_done(run_dir) >= 2, proc)  # so checkpoint step-000001 is complete
        pid = _pids(run_dir)["trainer-0"]
        os.kill(pid, signal.SIGKILL)
        code, err = _finish(proc)
    finally:
        proc.kill()
    assert code == 1, err[-4000:]
    found = re.search(rf"the trainer \(trainer-0, pid {pid}\) died at optimizer step \d+; resume from the newest "
                      r"checkpoint: asyncrl ckpt resume (\S+) \(step (\d+)\)", err)  # fmt: skip
    assert found, err[-4000:]
    checkpoint, step = Path(found.group(1)), int(found.group(2))
    assert step >= 1 and checkpoint.name == f"step-{step:06d}"
    assert verify(checkpoint) == []
