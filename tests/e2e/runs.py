"""What the end-to-end tests share: the `asyncrl` command in a child process, and a tiny run's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def asyncrl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m asyncrl ARGS`` from the repo root, its output captured; bounded by ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "asyncrl", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_tiny(run_dir: Path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """A quiet `asyncrl train configs/tiny.yaml` into ``run_dir`` that must succeed; its metrics and ledger."""
    proc = asyncrl("train", "configs/tiny.yaml", "--quiet", f"run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "ledger.jsonl")
