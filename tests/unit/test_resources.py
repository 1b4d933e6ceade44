"""Resident memory per process from /proc: the figures behind ``rss_mb`` in metrics.jsonl."""

import subprocess
import sys
import time

import pytest

from asyncrl.resources import process_memory_mb, ray_memory_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_own_process_has_a_resident_size_and_a_peak_at_least_as_large():
    memory = process_memory_mb()
    assert memory["rss"] > 1 and memory["peak"] >= memory["rss"]


def test_a_process_that_is_gone_reads_as_empty():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_memory_mb(child.pid) == {}


def test_descendants_are_summed_unless_excluded_with_their_subtrees():
    """A child that starts a grandchild: excluding the child drops both (other children of this
    process, e.g. a test session's redis-server, count the same either way)."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        child_rss, dropped = 0.0, 0.0
        for _ in range(100):  # until the grandchild is up
            child_rss = process_memory_mb(child.pid).get("rss", 0.0)
            dropped = ray_memory_mb(set())["rss"] - ray_memory_mb({child.pid})["rss"]
            if child_rss > 0 and dropped > 1.5 * child_rss:
                break
            time.sleep(0.05)
        assert child_rss > 0 and dropped > 1.5 * child_rss
    finally:
        child.kill()
        child.wait()
