"""Resident memory of the processes a run stands on, read from ``/proc`` (Linux), so users can size machines.

Each worker reports its own process (``process_memory_mb``); the driver adds itself, the
embedded redis-server and Ray's own processes (GCS, raylet, its agents and idle workers: the
driver's descendants that are neither a worker nor the store server). Reading is cheap (a few
small files per process) and never raises for a process that is gone.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
# A bound on the /proc walk when looking for Ray's processes: a run has a few dozen.
MAX_DESCENDANTS = 512


def process_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """``{"rss": VmRSS, "peak": VmHWM}`` of process ``pid`` in MB; ``{}`` if it is gone or not readable."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    fields = {"VmRSS:": "rss", "VmHWM:": "peak"}
    memory = {}
    for line in text.splitlines():
        name = line.split(maxsplit=1)[0] if line else ""
        if name in fields:
            memory[fields[name]] = int(line.split()[1]) / 1024  # kB
    return memory


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every live process, from ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name is in parentheses and may hold spaces: the parent pid follows the last ')'.
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    return children


def _subtree(children: dict[int, list[int]], root: int) -> list[int]:
    """Every descendant of ``root`` (at most ``MAX_DESCENDANTS``)."""
    found, queue = [], list(children.get(root, ()))
    while queue and len(found) < MAX_DESCENDANTS:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def ray_memory_mb(exclude: set[int]) -> dict[str, float]:
    """Summed ``rss`` and ``peak`` of Ray's own processes: this process's descendants outside ``exclude``
    (worker processes and the store server) and outside their subtrees. The peak is the sum of each
    process's peak, an upper bound of the group's."""
    children = _children()
    skipped = set(exclude)
    for pid in exclude:
        skipped.update(_subtree(children, pid))
    total = {"rss": 0.0, "peak": 0.0}
    for pid in _subtree(children, os.getpid()):
        if pid in skipped:
            continue
        memory = process_memory_mb(pid)
        for key in total:
            total[key] += memory.get(key, 0.0)
    return total
