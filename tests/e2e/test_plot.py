"""`asyncrl plot RUN_DIR` draws the curves of metrics.jsonl; a missing folder or file is one clear error line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncrl", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def write_metrics(run_dir: Path, steps: int = 6, truncated_tail: bool = False) -> None:
    lines = []
    for step in range(1, steps + 1):
        record = {
            "step": step,
            "reward_mean": math.nan if step == 2 else 0.1 * step,  # a step whose rewards all failed logs NaN
            "response_tokens_mean": 20.0 - step,
            "staleness_max": step % 2,
            "step_seconds": 1.5,
            "sync_seconds": 0.2,
        }
        if step > 1:  # the trainer reports loss only once it has trained
            record |= {"loss": 1.0 / step, "clip_fraction": 0.05}
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n" + ('{"step": 7, "rew' if truncated_tail else "")
    (run_dir / "metrics.jsonl").write_text(text)


@pytest.mark.parametrize("truncated_tail", [False, True])
def test_plot_writes_pngs(tmp_path, truncated_tail):
    write_metrics(tmp_path, truncated_tail=truncated_tail)
    proc = run_cli("plot", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    assert printed == [str(tmp_path / "reward.png"), str(tmp_path / "curves.png")]
    for name in printed:
        data = Path(name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_plot_without_reward_draws_only_the_grid(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    proc = run_cli("plot", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "curves.png")]


@pytest.mark.parametrize(
    "folder, metrics, fragment",
    [
        ("missing", None, "no such run folder"),
        ("run", None, "no metrics.jsonl in"),
        ("run", "", "has no step records"),
        ("run", "oops\n{}\n", "line 1 is not JSON"),
        ("run", '{"step": 1}\n', "none of the plotted metrics"),
    ],
)
def test_plot_errors_are_one_line(tmp_path, folder, metrics, fragment):
    (tmp_path / "run").mkdir()
    if metrics is not None:
        (tmp_path / "run" / "metrics.jsonl").write_text(metrics)
    proc = run_cli("plot", str(tmp_path / folder))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("asyncrl: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
