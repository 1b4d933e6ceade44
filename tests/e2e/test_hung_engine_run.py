"""A tiny run survives a hung rollout worker: its process is stopped (SIGSTOP, by pid) mid-run and never resumed.

The driver gives it ``sync.timeout_s`` (short here) to answer: the next sync it does not finish, or the status call
it leaves unanswered while Ray reports its process alive, names it as hung; the driver kills the actor so that Ray
restarts it (the kill ends the stopped process; no SIGCONT), re-syncs it and starts it again, and it takes back the
prompt entries it held. The run reaches its last step with exit 0 and trains every sample exactly once.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.e2e.runs import (
    every_prompt_trained_once,
    finish,
    read_jsonl,
    run_pids,
    start_asyncrl,
    steps_done,
    wait_for,
)

pytestmark = pytest.mark.slow

HANG_S = 4  # sync.timeout_s for this run: how long a silent worker is given before it counts as hung
RUN_TIMEOUT_S = 150


def test_a_stopped_rollout_worker_is_caught_by_the_sync_timeout_killed_and_restarted(tmp_path: Path) -> None:
    run_dir, log, steps = tmp_path / "run", tmp_path / "run.log", 4
    proc = start_asyncrl(
        log, "train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", f"run.steps={steps}",
        "scheduler.max_staleness=0", f"sync.timeout_s={HANG_S}",
    )  # fmt: skip
    stopped = None
    try:
        wait_for("the first step", lambda: steps_done(run_dir) >= 1, proc, timeout_s=RUN_TIMEOUT_S)
        stopped = run_pids(run_dir)["rollout-0"]
        os.kill(stopped, signal.SIGSTOP)
        code = finish(proc, log, RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if stopped is not None and _exists(stopped):  # the run failed to kill it: it must not stay stopped
            os.kill(stopped, signal.SIGKILL)
    output = log.read_text()
    assert code == 0, output[-4000:]
    hung = re.search(rf"rollout worker rollout-0 \(pid {stopped}\) hung: (.*); killing it so Ray restarts it", output)
    assert hung, output[-4000:]
    assert f"{HANG_S}s (sync.timeout_s)" in hung.group(1)
    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    assert [record["step"] for record in metrics] == list(range(1, steps + 1))
    last = metrics[-1]
    assert last["rollout_hangs"] == 1 and last["rollout_restarts"] == 1
    assert last["dropped_groups"] == 0  # the restarted engine generated with the current weights
    assert last["store_inflight_prompts"] == 0 and last["store_dead_letters"] == 0
    every_prompt_trained_once(ledger, steps, prompts_per_step=2, group_size=4)
    assert run_pids(run_dir)["rollout-0"] != stopped
    assert not _exists(stopped)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
