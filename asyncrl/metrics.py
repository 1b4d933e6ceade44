"""Run outputs: metrics.jsonl and TensorBoard events per step, ledger.jsonl per trained sample, reward.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunWriter:
    """Appends one JSON line per optimizer step and per trained sample; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.ledger = open(run_dir / "ledger.jsonl", "a", buffering=1)
        self.tensorboard = _tensorboard(run_dir / "tensorboard")

    def log_step(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        self.ledger.write("".join(json.dumps(row) + "\n" for row in rows))

    def close(self) -> None:
        self.metrics.close()
        self.ledger.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(folder))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_rewards(run_dir: Path) -> Path:
    """Write reward.png: mean reward per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["reward_mean"] for r in records], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    out = run_dir / "reward.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
