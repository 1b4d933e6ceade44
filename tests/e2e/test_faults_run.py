"""A tiny run survives the death of one process, killed by its pid with SIGKILL mid-run.

- A rollout worker: Ray restarts it, the controller syncs it to the current weights and starts it
  again, and it takes back the prompt entries it held; every prompt is still trained exactly once.
- The trainer: the run stops, exit 1, with an error naming the trainer and the newest checkpoint,
  which verifies intact.

The pids come from ``run.dir/processes.json``, which the driver writes from the actors' ``memory()``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from asyncrl.checkpoint import verify
from asyncrl.types import Groups, Streams
from storage import EmbeddedRedis, TrajectoryStore, connect
from tests.e2e.runs import every_prompt_trained_once, finish, read_jsonl, run_pids, start_asyncrl, steps_done, wait_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 240


def _start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """A quiet `asyncrl train configs/tiny.yaml` into ``tmp_path/run`` in the background, its output in
    ``tmp_path/run.log``."""
    return start_asyncrl(tmp_path / "run.log", "train", "configs/tiny.yaml", "--quiet", f"run.dir={tmp_path / 'run'}",
                         *overrides)  # fmt: skip


def _finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """The run's exit code and output, once it ends (killed if it outlives RUN_TIMEOUT_S)."""
    return finish(proc, log, RUN_TIMEOUT_S), log.read_text()


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_a_killed_rollout_worker_is_restarted_and_its_prompts_generated_again(tmp_path: Path, transport: str) -> None:
    """With the bucketed broadcast the restarted engine gets the trainer's weights mid-step (a snapshot) and joins
    the rebuilt group at the next sync; at k = 0 with one worker nothing stale may come of it."""
    run_dir, steps = tmp_path / "run", 4
    proc = _start(tmp_path, f"run.steps={steps}", "scheduler.max_staleness=0", f"sync.transport={transport}")
    try:
        wait_for("the first step", lambda: steps_done(run_dir) >= 1, proc)  # a weight sync has happened
        pids = run_pids(run_dir)
        url = EmbeddedRedis.running_url(run_dir / "redis")
        store = TrajectoryStore(connect(url, 5.0), "tiny", 5.0)
        # Kill it while it holds a prompt entry it read and has not finished.
        wait_for("a prompt held", lambda: store.pending(Streams.PROMPTS, Groups.ROLLOUT) > 0, proc)
        os.kill(pids["rollout-0"], signal.SIGKILL)
        store.close()
        code, err = _finish(proc, tmp_path / "run.log")
    finally:
        proc.kill()
    assert code == 0, err[-4000:]
    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    assert [record["step"] for record in metrics] == list(range(1, steps + 1))
    last = metrics[-1]
    assert last["rollout_restarts"] == 1 and last["prompts_reclaimed"] >= 1
    assert last["dropped_groups"] == 0  # the restarted engine generated with the current weights, not stale ones
    assert last["store_inflight_prompts"] == 0 and last["store_dead_letters"] == 0
    every_prompt_trained_once(ledger, steps, prompts_per_step=2, group_size=4)
    assert run_pids(run_dir)["rollout-0"] != pids["rollout-0"]


def test_a_killed_trainer_stops_the_run_naming_the_checkpoint_to_resume_from(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(tmp_path, "run.steps=30", "run.checkpoint_every=1")
    try:
        wait_for("two steps", lambda: steps_done(run_dir) >= 2, proc)  # so checkpoint step-000001 is complete
        pid = run_pids(run_dir)["trainer-0"]
        os.kill(pid, signal.SIGKILL)
        code, err = _finish(proc, tmp_path / "run.log")
    finally:
        proc.kill()
    assert code == 1, err[-4000:]
    found = re.search(rf"the trainer \(trainer-0, pid {pid}\) died at optimizer step \d+; resume from the newest "
                      r"checkpoint: asyncrl ckpt resume (\S+) \(step (\d+)\)", err)  # fmt: skip
    assert found, err[-4000:]
    checkpoint, step = Path(found.group(1)), int(found.group(2))
    assert step >= 1 and checkpoint.name == f"step-{step:06d}"
    assert verify(checkpoint) == []
