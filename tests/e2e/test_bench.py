"""`asyncrl bench rollout` runs both sides on the tiny model and ends with the ratio line.

No threshold on the ratio: timings vary by machine and load, so the test checks the contract only.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
RATIO_LINE = re.compile(r"^rollout ratio \(ours/bare vLLM\): (\d+\.\d+)$")


@pytest.mark.slow
def test_bench_rollout_prints_the_ratio_last():
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "rollout", "configs/tiny.yaml", "--prompts", "8", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = RATIO_LINE.match(lines[-1])
    assert match, proc.stdout
    assert float(match.group(1)) > 0
    assert any(line.split("|")[0].strip() == "median" for line in lines), proc.stdout
    assert "redis-server" in proc.stdout and "peak RSS" in proc.stdout
    assert lines[-2].startswith("run pairs (ours/baseline") and "over 1 pairs" in lines[-2], proc.stdout


@pytest.mark.slow
def test_bench_rollout_refuses_a_device_the_installed_vllm_does_not_run_on():
    """On the CPU build `--device cuda` is a clear error (exit 2), not a crash halfway through."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if current_platform.device_type == "cuda":
        pytest.skip("this machine's vLLM runs on cuda")
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "rollout", "--device", "cuda", "--prompts", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "--device cuda" in proc.stderr


STORE_RATIO_LINE = re.compile(r"^store ratio \(ours/raw Redis\): (\d+\.\d+)$")


@pytest.mark.slow
def test_bench_store_measures_every_side_and_prints_the_ratio_last():
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "store", "--trajectories", "400", "--prompt-tokens", "64",
         "--response-tokens", "64", "--rows", "32", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = STORE_RATIO_LINE.match(lines[-1])
    assert match, proc.stdout
    assert float(match.group(1)) > 0
    sides = ("ours (TrajectoryStore)", "raw redis SET/GET", "raw redis, zero-copy SET", "ray object-store queue")
    for side in (*sides, "in-process copy"):
        assert any(line.startswith(side) for line in lines), (side, proc.stdout)
    assert "400 trajectories" in proc.stdout and "redis-server" in proc.stdout


TRAIN_RATIO_LINE = re.compile(r"^train ratio \(ours/bare DeepSpeed\): (\d+\.\d+)$")


@pytest.mark.slow
def test_bench_train_runs_both_sides_on_the_same_batches_and_prints_the_ratio_last():
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "train", "configs/tiny.yaml", "--steps", "2", "--repeats", "1",
         "trainer.prompts_per_step=2", "trainer.micro_batch_size=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = TRAIN_RATIO_LINE.match(lines[-1])
    assert match, proc.stdout
    assert float(match.group(1)) > 0
    assert any(line.split("|")[0].strip() == "median" for line in lines), proc.stdout
    assert "2 optimizer steps/run of 2 prompts x 4 samples" in proc.stdout
    assert "ZeRO-1" in proc.stdout and "redis-server" in proc.stdout and "peak RSS" in proc.stdout
    assert lines[-2].startswith("run pairs (ours/baseline") and "over 1 pairs" in lines[-2], proc.stdout


@pytest.mark.slow
def test_bench_train_refuses_a_device_torch_does_not_see():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "train", "--device", "cuda", "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "--device cuda" in proc.stderr


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


PIPELINE_RATIO_LINE = re.compile(r"^pipeline ratio \(async k=2/sync k=0\): (\d+\.\d+)$")
PIPELINE_ROW = re.compile(r"^\s*1 \|\s+(\d) \|\s+(\d+\.\d+) \|\s+(\d\.\d+) \|\s+(\d\.\d+) \|\s+(\d+) \|\s+(\d+)$")


@pytest.mark.slow
def test_bench_pipeline_runs_every_bound_on_the_long_tail_and_prints_the_ratio_last():
    """Each bound's row: samples/s > 0, idle fractions in [0, 1], and no trained sample over that bound."""
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "bench", "pipeline", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "rollout.max_new_tokens=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = PIPELINE_RATIO_LINE.match(lines[-1])
    assert match, proc.stdout
    assert float(match.group(1)) > 0
    rows = [PIPELINE_ROW.match(line) for line in lines]
    rows = [row.groups() for row in rows if row]
    assert [int(row[0]) for row in rows] == [0, 1, 2], proc.stdout
    for bound, samples_per_s, trainer_idle, rollout_idle, staleness_max, _ in rows:
        assert float(samples_per_s) > 0
        assert 0 <= float(trainer_idle) <= 1 and 0 <= float(rollout_idle) <= 1
        assert int(staleness_max) <= int(bound)
    assert "lognormal(median 8, sigma 1.0) cut at 32" in proc.stdout
