"""`asyncrl bench pipeline`: the same job synchronous (max_staleness 0) and asynchronous (1, 2).

One store, one Ray session and one set of workers (a trainer, ``rollout.num_workers`` engines)
run every bound in turn, so start-up and compilation are paid once and every bound sees the same
processes, threads and cores. Per bound: a fresh ``Scheduler`` issuing the same prompts from
index 0 (so the same response-length budgets), ``--warmup`` untimed steps, then ``--steps`` timed
ones, then a drain (rollouts finish what they hold, the trainer acknowledges the rest untrained)
before the next bound.

The workload has a long-tailed response length: ``rollout.length_dist=lognormal`` gives each
prompt a ``max_tokens`` budget drawn from a seeded lognormal (``WORKLOAD`` below: median 8 tokens,
sigma 1.0, cut at 96), and the tiny model's random weights almost never stop before the budget.
With k = 0 every step waits for its batch's longest response; with k >= 1 the engines already
decode the next batches meanwhile and the trainer overlaps with generation.

Figures per bound: trained samples/s over the timed steps (samples / wall seconds of those steps),
the trainer's idle fraction (share of the steps it was not computing) and the rollout engines'
idle fraction (share of the steps an engine had no request), from the run's own step records.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from asyncrl.config import Config

# Prepended to the command's overrides, so any of them can be changed on the command line.
WORKLOAD = (
    "rollout.length_dist=lognormal",
    "rollout.length_median=8",
    "rollout.length_sigma=1.0",
    "rollout.max_new_tokens=96",
    "trainer.prompts_per_step=4",
    "trainer.micro_batch_size=8",
    "run.name=bench-pipeline",
)
BOUNDS = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class Measurement:
    """The timed steps of one bound."""

    max_staleness: int
    samples: int
    seconds: float
    trainer_idle: float  # step-time-weighted mean of trainer_idle_fraction
    rollout_idle: float  # step-time-weighted mean of rollout_idle_fraction
    staleness_max: int
    dropped: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def measure(records: list[dict], max_staleness: int) -> Measurement:
    """Sum the timed steps' records of one bound."""
    seconds = sum(r["step_seconds"] for r in records)
    return Measurement(
        max_staleness=max_staleness,
        samples=sum(r["samples_trained"] for r in records),
        seconds=seconds,
        trainer_idle=sum(r["trainer_idle_fraction"] * r["step_seconds"] for r in records) / seconds,
        rollout_idle=sum(r["rollout_idle_fraction"] * r["step_seconds"] for r in records) / seconds,
        staleness_max=max(r["staleness_max"] for r in records),
        dropped=sum(r["dropped"] for r in records),
    )


def run_bounds(cfg: Config, bounds: tuple[int, ...], steps: int, warmup: int, repeats: int) -> list[list[Measurement]]:
    """Per repeat, one Measurement per bound, all on one set of workers."""
    import dataclasses

    from asyncrl.controller import Pipeline
    from asyncrl.data import build_prompt_source
    from asyncrl.models import resolve_model_path
    from asyncrl.runtime import ray_session, store_server
    from asyncrl.scheduler import Scheduler

    model_path = str(resolve_model_path(cfg.model.path))
    prompts = build_prompt_source(cfg.data)
    results: list[list[Measurement]] = []
    with tempfile.TemporaryDirectory(prefix="asyncrl-bench-pipeline-") as tmp:
        with store_server(cfg, Path(tmp)) as url, ray_session(cfg):
            pipeline = Pipeline.launch(cfg, model_path, prompts, url)
            version = 0
            for _ in range(repeats):
                row = []
                for bound in bounds:
                    sched_cfg = dataclasses.replace(cfg.scheduler, max_staleness=bound)
                    scheduler = Scheduler.starting_at(sched_cfg, cfg.trainer.prompts_per_step, version)
                    records = [pipeline.step(step, scheduler)[0] for step in range(warmup + steps)]
                    row.append(measure(records[warmup:], bound))
                    pipeline.drain()
                    if scheduler.engine_version != scheduler.version:  # scheduler.sync=deferred skipped the last
                        pipeline.weight_sync.sync(scheduler.version)
                        scheduler.on_synced()
                    version = scheduler.version
                results.append(row)
            pipeline.stop()
    return results


def report(cfg: Config, results: list[list[Measurement]], out: TextIO) -> None:
    rc = cfg.rollout
    print(
        f"workload: {cfg.trainer.prompts_per_step} prompts x {rc.group_size} samples per step, {rc.num_workers} "
        f"rollout worker(s); per-prompt max_tokens ~ {rc.length_dist}(median {rc.length_median}, sigma "
        f"{rc.length_sigma}) cut at {rc.max_new_tokens}",
        file=out,
    )
    print("repeat | max_staleness | samples/s | trainer idle | rollout idle | staleness max | dropped", file=out)
    for index, row in enumerate(results):
        for m in row:
            print(
                f"{index + 1:>6} | {m.max_staleness:>13} | {m.samples_per_s:9.2f} | {m.trainer_idle:12.2f} | "
                f"{m.rollout_idle:12.2f} | {m.staleness_max:>13} | {m.dropped:>7}",
                file=out,
            )
    bounds = [m.max_staleness for m in results[0]]
    medians = {b: statistics.median(row[i].samples_per_s for row in results) for i, b in enumerate(bounds)}
    for i, bound in enumerate(bounds):
        trainer_idle = statistics.median(row[i].trainer_idle for row in results)
        rollout_idle = statistics.median(row[i].rollout_idle for row in results)
        print(
            f"median k={bound}: {medians[bound]:.2f} samples/s, ratio {medians[bound] / medians[bounds[0]]:.2f}, "
            f"trainer idle {trainer_idle:.2f}, rollout idle {rollout_idle:.2f}",
            file=out,
        )
    top = bounds[-1]
    print(f"pipeline ratio (async k={top}/sync k={bounds[0]}): {medians[top] / medians[bounds[0]]:.2f}", file=out)


def bench_pipeline(cfg: Config, steps: int, warmup: int, repeats: int, out: TextIO = sys.stdout) -> None:
    report(cfg, run_bounds(cfg, BOUNDS, steps, warmup, repeats), out)
