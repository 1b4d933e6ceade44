"""What the end-to-end tests share: the `asyncrl` command in a child process, and a tiny run's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parents[2]


def asyncrl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m asyncrl ARGS`` from the repo root, its output captured; bounded by ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "asyncrl", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def start_asyncrl(log: Path, *args: str) -> subprocess.Popen:
    """``python -m asyncrl ARGS`` in the background (a driver to signal or kill by its pid), stdout and stderr
    into the file ``log``: a pipe nobody reads could fill up and stall the run."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "asyncrl", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def wait_for(what: str, check: Callable[[], object], proc: subprocess.Popen, timeout_s: float = 240) -> object:
    """Poll ``check`` every 20 ms until it returns something truthy, and return that; fails when ``proc``
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout_s}s")


def finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """The exit code of ``proc`` (started by ``start_asyncrl`` with output into ``log``) once it ends; one that
    outlives ``timeout_s`` is killed, and the test fails with the end of its output (where it stalled)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"the run did not end within {timeout_s}s:\n{Path(log).read_text()[-4000:]}") from None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def steps_done(run_dir: Path) -> int:
    """Steps the run in ``run_dir`` logged so far (lines of metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def run_pids(run_dir: Path) -> dict[str, int]:
    """The run's processes (``run.dir/processes.json``: driver, trainer-0, rollout-<i>, redis); {} until written."""
    try:
        return json.loads((run_dir / "processes.json").read_text())
    except (OSError, ValueError):
        return {}


def every_prompt_trained_once(ledger: list[dict], steps: int, prompts_per_step: int, group_size: int) -> None:
    """With max_staleness 0 each step trains exactly the prompts issued for it, so a lost prompt stalls the
    run and one generated twice shows up here."""
    assert len({row["sample_id"] for row in ledger}) == len(ledger) == steps * prompts_per_step * group_size
    per_prompt = Counter(row["sample_id"].split("-")[0] for row in ledger)
    assert sorted(per_prompt.values()) == [group_size] * (steps * prompts_per_step), per_prompt


def train_tiny(run_dir: Path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """A quiet `asyncrl train configs/tiny.yaml` into ``run_dir`` that must succeed; its metrics and ledger."""
    proc = asyncrl("train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
