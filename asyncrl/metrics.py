"""Run outputs: metrics.jsonl and TensorBoard events per step, ledger.jsonl per trained sample, reward.png, curves.png."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from asyncrl.config import ConfigError

log = logging.getLogger(__name__)


RUN_OUTPUTS = (
    "config.yaml", "metrics.jsonl", "ledger.jsonl", "reward.png", "curves.png", "tensorboard", "wandb", "redis",
    "checkpoints",
)  # fmt: skip


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create the run folder; an earlier run that trained there is refused, or removed when ``overwrite``.

    Leftovers of a start that never reached a step (config.yaml, redis/) are simply replaced.
    Only the files a run writes are removed, never anything else in the folder.
    """
    earlier = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    trained = [path.name for path in earlier if path.name in ("metrics.jsonl", "ledger.jsonl", "checkpoints")]
    if trained and not overwrite:
        raise ConfigError(
            f"run.dir {run_dir} already holds a run ({trained[0]}); pick another run.name or run.dir, "
            "or pass run.overwrite=true to replace it"
        )
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class RunWriter:
    """Appends one JSON line per optimizer step and per trained sample; mirrors scalars to TensorBoard, and to
    W&B when ``wandb`` holds ``wandb.init`` arguments (``run.wandb``)."""

    def __init__(self, run_dir: Path, wandb: dict[str, Any] | None = None, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard drops the events logged from it on before."""
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.ledger = open(run_dir / "ledger.jsonl", "a", buffering=1)
        self.tensorboard = _tensorboard(run_dir / "tensorboard", purge_step)
        self.wandb = None if wandb is None else _wandb_run(run_dir, wandb)

    def log_step(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars.pop("step", None)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        self.ledger.write("".join(json.dumps(row) + "\n" for row in rows))

    def close(self) -> None:
        self.metrics.close()
        self.ledger.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard(folder: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def wandb_options(cfg: Any) -> dict[str, Any] | None:
    """``wandb.init`` arguments of a run with ``run.wandb=true`` (project, name, the resolved config), else None."""
    import dataclasses

    if not cfg.run.wandb:
        return None
    return {"project": cfg.run.wandb_project, "name": cfg.run.name, "config": dataclasses.asdict(cfg)}


def _wandb_run(run_dir: Path, init: dict[str, Any]):
    """A W&B run started with ``init`` (project, name, config), its files under the run folder."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "run.wandb=true needs the wandb package, which is not installed: pip install wandb, or set run.wandb=false"
        ) from None
    return wandb.init(dir=str(run_dir), **init)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl; a cut-off last line (a run still writing, or killed mid-line) is skipped."""
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{run_dir / 'metrics.jsonl'} line {number} is not JSON: {err}") from None
    return records


# (panel title, metrics drawn in it); a panel appears only when one of its metrics was logged.
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mean reward", ("reward_mean",)),
    ("mean response tokens", ("response_tokens_mean",)),
    ("max staleness", ("staleness_max",)),
    ("loss", ("loss",)),
    ("clip fraction", ("clip_fraction",)),
    ("seconds", ("step_seconds", "sync_seconds")),
)


def plot_run(run_dir: Path) -> list[Path]:
    """Write reward.png and curves.png (a grid of the main metrics) from metrics.jsonl; returns the files written."""
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no step records yet")
    written = [plot_rewards(run_dir, records)] if _series(records, "reward_mean")[0] else []
    panels = [(title, keys) for title, keys in CURVE_PANELS if any(_series(records, key)[0] for key in keys)]
    if panels:
        written.append(_plot_panels(run_dir, records, panels))
    return written


def plot_rewards(run_dir: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """Write reward.png: mean reward per optimizer step."""
    plt = _pyplot()
    steps, values = _series(read_metrics(run_dir) if records is None else records, "reward_mean")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    return _save(fig, run_dir / "reward.png")


def _plot_panels(run_dir: Path, records: list[dict[str, Any]], panels: list[tuple[str, tuple[str, ...]]]) -> Path:
    plt = _pyplot()
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    cells = list(axes.flat)  # the grid may have a cell or two more than there are panels
    for ax, (title, keys) in zip(cells, panels, strict=False):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=key)
        if len(keys) > 1:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in cells[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(run_dir.name)
    return _save(fig, run_dir / "curves.png")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that logged ``key`` as a number."""
    points = [
        (record.get("step", number), record[key])
        for number, record in enumerate(records, start=1)
        if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)
    ]
    return [step for step, _ in points], [value for _, value in points]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out
