"""`asyncrl bench sync` measures every side and ends with the ratio line.

No threshold on the figures: timings vary by machine and load, so the test checks the contract only.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SYNC_RATIO_LINE = re.compile(r"^sync ratio \(ours/naive per-tensor\): (\d+\.\d+)$")


@pytest.mark.slow
def test_bench_sync_measures_every_side_and_prints_the_ratio_last():
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "sync", "--repeats", "1", "--syncs", "2", "sync.bucket_mb=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = SYNC_RATIO_LINE.match(lines[-1])
    assert match, proc.stdout
    assert float(match.group(1)) > 0
    for side in ("in-process copy", "ours (bucketed broadcast)", "naive per-tensor"):
        assert any(line.startswith(side) and "GB/s" in line for line in lines), (side, proc.stdout)
    assert any(line.startswith("decode ratio (during sync/without, inflight): ") for line in lines), proc.stdout
    model_line = next(line for line in lines if line.startswith("model: "))
    megabytes, tensors = re.match(r"model: (\d+\.\d) MB float32, (\d+) tensors", model_line).groups()
    assert float(megabytes) >= 100 and int(tensors) >= 100
