"""A tiny run whose embedded redis-server is killed with SIGKILL (by its pid, from processes.json) after step 1.

- With store.appendonly=true the keeper restarts it on its AOF, every client reconnects, and the run reaches its
  last step, exit 0, with every sample trained exactly once (no put applied twice, none lost) and one restart
  logged and counted.
- With AOF off the run ends, exit 1, with an error saying the server's data is gone because AOF was off.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.runs import finish, read_jsonl, start_asyncrl, wait_for

pytestmark = pytest.mark.slow

STEPS, PROMPTS, GROUP = 4, 2, 4
RUN_TIMEOUT_S = 240


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _kill_redis_after_step_one(run_dir: Path, proc) -> int:
    wait_for("step 1", lambda: _steps_logged(run_dir) >= 1, proc, RUN_TIMEOUT_S)
    pid = json.loads((run_dir / "processes.json").read_text())["redis"]
    assert json.loads((run_dir / "redis" / "server.json").read_text())["pid"] == pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_redis_server_with_aof_is_restarted_and_the_run_finishes(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    # max_staleness 0: each step trains exactly the prompts issued for it, so a lost entry stalls the run.
    job = ("configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", f"run.steps={STEPS}", "scheduler.max_staleness=0")
    proc = start_asyncrl(log, "train", *job, "store.appendonly=true")
    try:
        killed = _kill_redis_after_step_one(run_dir, proc)
        code = finish(proc, log, RUN_TIMEOUT_S)
    finally:
        proc.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert f"redis-server (pid {killed}, {run_dir.resolve() / 'redis'}) was killed by SIGKILL; restarting it" in text
    assert "the embedded redis-server is back in pid" in text

    metrics, ledger = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
    assert [record["step"] for record in metrics] == list(range(1, STEPS + 1))
    assert [record["policy_version"] for record in metrics] == list(range(1, STEPS + 1))
    last = metrics[-1]
    assert last["store_restarts"] == 1
    assert last["store_lost_replies"] >= 0  # reported; whether the kill cut off a read's reply is chance
    assert last["store_inflight_prompts"] == 0 and last["store_dead_letters"] == 0 and last["dropped_groups"] == 0
    assert all(record["samples_trained"] == PROMPTS * GROUP for record in metrics)
    sample_ids = [row["sample_id"] for row in ledger]
    assert len(sample_ids) == len(set(sample_ids)) == STEPS * PROMPTS * GROUP  # each trained once, none twice
    per_prompt = Counter(row["prompt_id"] for row in ledger)
    assert sorted(per_prompt.values()) == [GROUP] * (STEPS * PROMPTS), per_prompt
    assert json.loads((run_dir / "processes.json").read_text())["redis"] != killed


def test_without_aof_a_killed_redis_server_ends_the_run_saying_so(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    job = ("configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", "run.steps=30", "store.reconnect_s=3")
    proc = start_asyncrl(log, "train", *job)
    try:
        killed = _kill_redis_after_step_one(run_dir, proc)
        code = finish(proc, log, RUN_TIMEOUT_S)
    finally:
        proc.kill()
    text = log.read_text()
    assert code == 1, text[-4000:]
    lost = f"the embedded redis-server (pid {killed}, {run_dir.resolve() / 'redis'}) was killed by SIGKILL and ran "
    assert f"asyncrl: error: {lost}with store.appendonly=false" in text, text[-4000:]
    assert _steps_logged(run_dir) < 30
