"""The sandbox contains what it promises: wall time, memory, file size, network, environment, temp folder."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncrl.rewards import code_reward
from asyncrl.sandbox import MAX_OUTPUT_BYTES, run_python

pytestmark = pytest.mark.timeout(30)

MARGIN_S = 1.5  # start-up, kill and reap on a loaded 2-core machine
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed orphan waits briefly for init to reap it)."""
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return stat is not None and stat[0] != "Z"


def _running_in_group(pgid: int) -> list[int]:
    """Pids of the non-zombie processes whose process group is ``pgid``."""
    members = []
    for path in Path("/proc").glob("[0-9]*/stat"):
        stat = _stat(path)
        if stat is not None and stat[0] != "Z" and int(stat[2]) == pgid:
            members.append(int(path.parent.name))
    return members


def _stat(path: Path) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None once the pid is gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.fixture
def listener() -> Iterator[int]:
    """Port of a socket listening on 127.0.0.1 in the test's own network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_correct_solution_scores_one() -> None:
    response = f"Here you go:\n```python\n{SOLUTION}```\nDone."
    assert code_reward("add two numbers", response, tests=TESTS) == 1.0


def test_last_python_block_is_the_one_run() -> None:
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    right = f"```python\n{SOLUTION}```"
    assert code_reward("p", f"{wrong}\nFixed:\n{right}", tests=TESTS) == 1.0
    assert code_reward("p", f"{right}\nOops:\n{wrong}", tests=TESTS) == 0.0


def test_response_without_fence_is_run_whole() -> None:
    assert code_reward("p", SOLUTION, tests=TESTS) == 1.0


def test_wrong_solution_scores_zero() -> None:
    assert code_reward("p", "```python\ndef add(a, b):\n    return a * b\n```", tests=TESTS) == 0.0


def test_syntax_error_scores_zero() -> None:
    assert code_reward("p", "```python\ndef add(a, b) return a + b\n```", tests=TESTS) == 0.0


def test_infinite_loop_scores_zero_within_the_timeout() -> None:
    start = time.monotonic()
    assert code_reward("p", "```python\nwhile True:\n    pass\n```", tests=TESTS, timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 1.0 + MARGIN_S


def test_busy_loop_is_killed_with_its_process_group() -> None:
    code = (
        "import os, sys\n"
        "child = os.fork()\n"  # a second member of the group, which must die with the first
        "if child == 0:\n"
        "    while True: pass\n"
        "print(os.getpid(), child, flush=True)\n"
        "while True: pass\n"
    )
    timeout_s = 1.0
    result = run_python(code, timeout_s=timeout_s)
    assert result.timed_out
    assert result.killed_reason == "wall-clock timeout"
    assert result.returncode == -9
    assert result.seconds < timeout_s + MARGIN_S
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 2.0  # SIGKILL is delivered asynchronously to the orphaned fork
    while (any(_running(pid) for pid in pids) or _running_in_group(pids[0])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in pids)
    assert _running_in_group(pids[0]) == []


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**10)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))\n"],
    ids=["one-huge-allocation", "growing-list"],
)
def test_unbounded_allocation_fails_within_limits(code: str) -> None:
    result = run_python(code, timeout_s=5.0, memory_mb=256)
    assert result.returncode != 0
    assert not result.timed_out
    assert "MemoryError" in result.stderr or result.returncode < 0
    assert len(bytearray(10**6)) == 10**6  # the test process itself still allocates


def test_writing_a_huge_file_is_stopped_by_the_file_size_limit() -> None:
    code = "with open('big', 'wb') as f:\n    for _ in range(100):\n        f.write(b'x' * 2**20)\nprint('wrote it')\n"
    result = run_python(code, timeout_s=5.0)
    assert result.returncode != 0
    assert "wrote it" not in result.stdout
    # Python ignores SIGXFSZ, so the write raises EFBIG instead of the process being killed.
    assert "File too large" in result.stderr or result.killed_reason == "signal SIGXFSZ"


def _connect_code(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\nprint('connected')\n"


def test_loopback_is_unreachable_without_network(listener: int) -> None:
    code = _connect_code(listener)
    result = run_python(code, timeout_s=5.0)
    assert result.returncode != 0
    assert "connected" not in result.stdout


def test_loopback_is_reachable_with_network(listener: int) -> None:
    """The control for the test above: the same code connects when the network is allowed."""
    code = _connect_code(listener)
    result = run_python(code, timeout_s=5.0, network=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "connected"


def test_child_does_not_see_the_parent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCRL_SANDBOX_SECRET", "hunter2")
    result = run_python("import os\nfor key, value in os.environ.items():\n    print(key, value)\n")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    keys = {line.split(" ", 1)[0] for line in result.stdout.splitlines()}
    assert keys <= {"PATH", "HOME", "LC_CTYPE"}  # LC_CTYPE: Python's own C-locale coercion


def test_temp_folder_is_the_cwd_and_is_removed() -> None:
    result = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert result.returncode == 0, result.stderr
    workdir = Path(result.stdout.strip())
    assert workdir.name.startswith("asyncrl-sandbox-")
    assert not workdir.exists()


def test_stdin_is_fed_and_output_is_truncated() -> None:
    result = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('x' * 10**6)\n", stdin="hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HELLO\n")
    assert len(result.stdout) == MAX_OUTPUT_BYTES
