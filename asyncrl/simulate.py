"""A discrete-event model of the pipeline, to plan a run past the machines at hand.

What it models (each piece mirrors the real code):
- Admission (asyncrl/scheduler.py): groups issued minus dropped never exceed
  ``(version + max_staleness + 1) * prompts_per_step``. The controller (``_await_step``) issues
  what admission allows as soon as a step starts, then again on every ``admission_poll_s`` tick
  until the step ends; each poll reads the trainer's drops after issuing, so a dropped group's
  slot is refilled one poll later (``admission_poll_s=0``: as soon as a slot opens).
- Engines (rollout/worker.py): each takes whole groups (one store entry each) at once while
  it has a free sequence slot of ``max_num_seqs`` (an idle worker's blocked read wakes on the
  first entry and reads again at once after a read that found some; a group's samples past the
  slots wait in the engine's queue), and decodes up to ``max_num_seqs`` sequences together
  (continuous batching): one decode step costs
  ``engine_step_s * (1 + engine_seq_share * (running - 1)) / pool speed`` and gives every
  running sequence a token. A group reaches the trainer ``reward_s`` after its last sample
  ends (scoring off the engine, a reward stage, the store hand-off).
- Trainer (trainers/worker.py): consumes completed groups in completion order, drops one
  whose ``version_start`` is over the bound, trains each accepted group as it arrives
  (streaming micro-batches) after ``trainer_group_s`` of its own handling (store read, collate,
  ledger: time the trainer's wait metric counts), and ends the step ``step_overhead_s`` after
  the last one.
- Sync (asyncrl/controller.py): after each step, ``sync_latency_s + model_gb / link_gbps``
  during which the trainer waits. The engines keep decoding at the old version (staged weights
  swap in between two engine steps) unless ``sync.mode=pause`` with a bucketed transport, where
  every engine pauses for the whole sync; engines then sample at the new version.

Calibration (``calibrate``) takes every cost a run's metrics.jsonl measures (training tokens/s,
sync, step overhead, the engines' decode rate from ``rollout_decode_by_worker``, the pipeline
stages' seconds per group as ``reward_s``) and fits only
``trainer_group_s``, the one cost no metric holds, to the measured trainer wait; a fit that ends
at a bound of its range is reported as such.

Progress between events is fluid (sequences advance by fractional tokens), so a run of many
engines and long responses costs one event per sequence, not per token.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from asyncrl.config import Config, SimulateConfig, load_config
from asyncrl.placement import pools as worker_pools

# Response-length samplers by simulate.response_length: (rng, median, sigma) -> tokens before the cap.
LENGTH_SAMPLERS: dict[str, Callable[[random.Random, float, float], float]] = {
    "fixed": lambda rng, median, sigma: median,
    "lognormal": lambda rng, median, sigma: rng.lognormvariate(math.log(median), sigma),
}


@dataclass(slots=True)
class Result:
    """What one simulated run predicts; rates and fractions are over steps 2..N."""

    max_staleness: int
    trainers: int
    rollouts: int
    samples_per_s: float
    tokens_per_s: float
    step_seconds: float
    trainer_wait_seconds: float
    trainer_idle: float
    rollout_idle: float
    decode_tokens_per_s: float  # an engine's tokens per busy second, as rollout_decode_by_worker measures it
    staleness_mean: float
    staleness_max: int
    dropped_groups: int


@dataclass(slots=True)
class _Group:
    lengths: list[float]
    remaining: list[float] = field(default_factory=list)
    version_start: int = 0


@dataclass(slots=True)
class _Engine:
    speed: float
    max_seqs: int  # sequences decoded at once (rollout.max_num_seqs); more wait in the engine's queue
    running: list[_Group] = field(default_factory=list)
    version: int = 0
    updated_at: float = 0.0
    paused_until: float = 0.0
    busy: float = 0.0
    tokens: float = 0.0  # sampled since the start
    epoch: int = 0  # bumps whenever its next-finish event is superseded


class _Pipeline:
    """One simulated run; ``run()`` returns its Result."""

    def __init__(self, cfg: Config, max_staleness: int, trainers: int, rollout_pools: list[tuple[str, int]]):
        sim = cfg.simulate
        self.cfg, self.sim, self.max_staleness, self.trainers = cfg, sim, max_staleness, trainers
        self.batch = cfg.trainer.prompts_per_step
        self.group_size = cfg.rollout.group_size
        self.rng = random.Random(sim.seed)
        self.median = sim.length_median or float(cfg.rollout.max_new_tokens)
        self.engines = [
            _Engine(speed=sim.pool_speed.get(name, 1.0), max_seqs=cfg.rollout.max_num_seqs)
            for name, count in rollout_pools
            for _ in range(count)
        ]
        self.sync_s = sim.sync_latency_s + (sim.model_gb / sim.link_gbps if sim.link_gbps > 0 else 0.0)
        self.sync_pauses = cfg.sync.mode == "pause" and cfg.sync.transport != "object_store"  # else in flight
        self.events: list[tuple[float, int, str, object]] = []
        self.order = itertools.count()
        self.now = 0.0
        self.version = 0
        self.issued = self.dropped = 0
        self.dropped_seen = 0  # drops the controller has read: only these free admission slots
        self.queue: deque[_Group] = deque()  # issued, not yet taken by an engine
        self.ready: deque[_Group] = deque()  # scored, not yet consumed by the trainer
        self.accepted = 0
        self.trainer_free_at = 0.0
        self.in_step = False
        self.step_started = 0.0
        self.step_compute = 0.0
        self.step_log: list[dict] = []
        self.staleness: list[int] = []
        self.step_tokens = 0.0  # response tokens trained in the current step

    # events ---------------------------------------------------------------------------------
    def _at(self, time: float, kind: str, payload: object = None) -> None:
        heapq.heappush(self.events, (time, next(self.order), kind, payload))

    def run(self) -> Result:
        self._start_step()
        steps = self.sim.steps
        while len(self.step_log) < steps:
            if not self.events:
                raise RuntimeError("simulation stalled: no event left before the last step (a bug in the model)")
            self.now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(payload)
        return self._result()

    def _start_step(self) -> None:
        self.in_step, self.step_started, self.step_compute, self.accepted = True, self.now, 0.0, 0
        self.step_tokens = 0.0
        self.trainer_free_at = self.now
        self._poll()  # the controller issues before its first wait: the step's prompts go out now
        while self.ready and self.accepted < self.batch:
            self._consume(self.ready.popleft())

    def _on_poll(self, version: int) -> None:
        if not self.in_step or version != self.version:
            return  # the controller polls only while waiting on this step
        self._poll()

    def _poll(self) -> None:
        """One pass of the controller's loop: issue what admission allows, then read the drops (they free
        their slots for the next pass), then wait a tick for the step."""
        self._issue()
        self.dropped_seen = self.dropped
        if self.sim.admission_poll_s > 0:
            self._at(self.now + self.sim.admission_poll_s, "poll", self.version)

    def _issue(self) -> None:
        window = (self.version + self.max_staleness + 1) * self.batch
        for _ in range(max(0, window - (self.issued - self.dropped_seen))):
            lengths = [self._length() for _ in range(self.group_size)]
            self.queue.append(_Group(lengths=lengths, remaining=list(lengths)))
            self.issued += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand the queued groups out one by one, each to the engine with the fewest unfinished sequences that has a
        free slot. The controller pushes one store entry per group; each entry wakes the worker blocked longest on
        the stream, which reads again at once, so a burst spreads over the workers with room rather than filling
        one engine before the next."""
        for engine in self.engines:
            self._advance(engine)
        unfinished = [sum(1 for g in e.running for r in g.remaining if r > 0) for e in self.engines]
        taken = set()
        while self.queue:
            free = [i for i, engine in enumerate(self.engines) if unfinished[i] < engine.max_seqs]
            if not free:
                break
            index = min(free, key=unfinished.__getitem__)
            self._take(self.engines[index], self.queue.popleft())
            unfinished[index] += self.group_size
            taken.add(index)
        for index in sorted(taken):
            self._schedule(index)

    def _take(self, engine: _Engine, group: _Group) -> None:
        # A group taken during a weight reload starts after it, at the version being synced.
        group.version_start = engine.version if self.now >= engine.paused_until else self.version + 1
        engine.running.append(group)

    def _length(self) -> float:
        sampled = LENGTH_SAMPLERS[self.sim.response_length](self.rng, self.median, self.sim.length_sigma)
        return float(min(self.cfg.rollout.max_new_tokens, max(1, round(sampled))))

    # engines --------------------------------------------------------------------------------
    @staticmethod
    def _active(engine: _Engine) -> list[tuple[_Group, int]]:
        """The (group, sample) pairs the engine decodes now: the first ``max_seqs`` unfinished ones in arrival order
        (the rest wait in its queue, as vLLM schedules waiting requests first come, first served)."""
        active = []
        for group in engine.running:
            for sample, remaining in enumerate(group.remaining):
                if remaining > 0:
                    active.append((group, sample))
                    if len(active) == engine.max_seqs:
                        return active
        return active

    def _step_time(self, engine: _Engine, running: int) -> float:
        return self.sim.engine_step_s * (1 + self.sim.engine_seq_share * max(0, running - 1)) / engine.speed

    def _advance(self, engine: _Engine) -> None:
        """Bring ``engine``'s sequences forward to now."""
        start = max(engine.updated_at, engine.paused_until)
        active = self._active(engine) if self.now > start else []
        if active:
            tokens = (self.now - start) / self._step_time(engine, len(active))
            for group, sample in active:
                engine.tokens += min(group.remaining[sample], tokens)
                group.remaining[sample] = max(0.0, group.remaining[sample] - tokens)
            engine.busy += self.now - start
        engine.updated_at = max(self.now, engine.updated_at)

    def _fill(self, index: int) -> None:
        """Give the engine queued groups while it has a free sequence slot (rollout/worker.py ``_free_groups``: a
        group may take the last free slots; its other samples wait in the engine's queue)."""
        engine = self.engines[index]
        self._advance(engine)
        unfinished = sum(1 for group in engine.running for remaining in group.remaining if remaining > 0)
        while self.queue and unfinished < engine.max_seqs:
            self._take(engine, self.queue.popleft())
            unfinished += self.group_size
        self._schedule(index)

    def _schedule(self, index: int) -> None:
        engine = self.engines[index]
        engine.epoch += 1
        active = self._active(engine)
        if active:
            start = max(self.now, engine.paused_until)
            first = min(group.remaining[sample] for group, sample in active)
            self._at(start + first * self._step_time(engine, len(active)), "engine", (index, engine.epoch))

    def _on_engine(self, payload: tuple[int, int]) -> None:
        index, epoch = payload
        engine = self.engines[index]
        if epoch != engine.epoch:
            return
        self._advance(engine)
        for group in list(engine.running):
            group.remaining = [0.0 if 0 < r < 1e-9 else r for r in group.remaining]
            if all(r <= 0 for r in group.remaining):
                engine.running.remove(group)
                self._at(self.now + self.sim.reward_s, "scored", group)
        self._fill(index)

    # trainer --------------------------------------------------------------------------------
    def _on_scored(self, group: _Group) -> None:
        if self.in_step and self.accepted < self.batch:
            self._consume(group)
        else:
            self.ready.append(group)

    def _consume(self, group: _Group) -> None:
        if self.version - group.version_start > self.max_staleness:
            self.dropped += 1  # its admission slot opens once the controller reads the drop
            if self.sim.admission_poll_s == 0:
                self.dropped_seen = self.dropped
                self._issue()
            return
        self.staleness.append(self.version - group.version_start)
        compute = sum(group.lengths) / (self.sim.train_tokens_per_s * self.trainers)
        handling = self.sim.trainer_group_s / self.trainers
        self.trainer_free_at = max(self.now, self.trainer_free_at) + handling + compute
        self.step_compute += compute
        self.step_tokens += sum(group.lengths)
        self.accepted += 1
        if self.accepted == self.batch:
            self._at(self.trainer_free_at + self.sim.step_overhead_s, "step_done")

    def _on_step_done(self, _payload: object) -> None:
        self.in_step = False
        for index, engine in enumerate(self.engines if self.sync_pauses else []):
            self._advance(engine)
            engine.paused_until = self.now + self.sync_s
            self._schedule(index)
        self._at(self.now + self.sync_s, "synced", self.now)

    def _on_synced(self, trained_at: float) -> None:
        self.version += 1
        for engine in self.engines:
            engine.version = self.version
        wait = trained_at - self.step_started - self.step_compute - self.sim.step_overhead_s
        for engine in self.engines:
            self._advance(engine)
        self.step_log.append(
            {
                "end": self.now,
                "seconds": self.now - self.step_started,
                "wait": max(0.0, wait),
                "busy": self.step_compute,
                "tokens": self.step_tokens,
                "engine_busy": sum(e.busy for e in self.engines),  # since the start, all engines
                "engine_tokens": sum(e.tokens for e in self.engines),
            }
        )
        self._start_step()

    def _result(self) -> Result:
        measured = self.step_log[1:]
        start = self.step_log[0]["end"]
        span = self.step_log[-1]["end"] - start
        busy = sum(s["busy"] for s in measured) + len(measured) * (self.sim.step_overhead_s + self.sync_s)
        first, last = self.step_log[0], self.step_log[-1]
        engine_busy = last["engine_busy"] - first["engine_busy"]
        engine_tokens = last["engine_tokens"] - first["engine_tokens"]
        return Result(
            max_staleness=self.max_staleness,
            trainers=self.trainers,
            rollouts=len(self.engines),
            samples_per_s=len(measured) * self.batch * self.group_size / span,
            tokens_per_s=sum(s["tokens"] for s in measured) / span,
            step_seconds=span / len(measured),
            trainer_wait_seconds=sum(s["wait"] for s in measured) / len(measured),
            trainer_idle=max(0.0, 1 - busy / span),
            rollout_idle=max(0.0, 1 - engine_busy / (span * len(self.engines))),
            decode_tokens_per_s=engine_tokens / engine_busy if engine_busy > 0 else 0.0,
            staleness_mean=sum(self.staleness) / len(self.staleness),
            staleness_max=max(self.staleness),
            dropped_groups=self.dropped,
        )


def simulate(cfg: Config, max_staleness: int | None = None, split: tuple[int, list[tuple[str, int]]] | None = None):
    """Simulate ``cfg`` at ``max_staleness`` (default: the config's) with ``split`` = (trainer workers,
    [(rollout pool, workers)]) (default: the config's pools)."""
    trainers, rollout_pools = split or _split(cfg)
    k = cfg.scheduler.max_staleness if max_staleness is None else max_staleness
    return _Pipeline(cfg, k, trainers, rollout_pools).run()


def _split(cfg: Config) -> tuple[int, list[tuple[str, int]]]:
    pool_list = worker_pools(cfg)
    trainers = sum(p.count for p in pool_list if p.role == "trainer")
    return trainers, [(p.name, p.count) for p in pool_list if p.role == "rollout"]


def splits(cfg: Config) -> list[tuple[int, list[tuple[str, int]]]]:
    """The pool splits of ``simulate.rollout_share_sweep``: the same accelerators (CPUs without GPUs) shared
    out again between the trainer pool and the rollout pools (in their original proportions)."""
    if not cfg.simulate.rollout_share_sweep:
        return [_split(cfg)]
    pool_list = worker_pools(cfg)

    def units(pool) -> float:
        return pool.gpus or pool.cpus or 1.0

    trainer = next(p for p in pool_list if p.role == "trainer")
    rollout = [p for p in pool_list if p.role == "rollout"]
    total = sum(units(p) * p.count for p in pool_list)
    rollout_total = sum(p.count for p in rollout)
    found = []
    for share in cfg.simulate.rollout_share_sweep:
        trainers = max(1, round(total * (1 - share) / units(trainer)))
        left = total - trainers * units(trainer)
        counts = [max(1, round(left * p.count / rollout_total / units(p))) for p in rollout]
        found.append((trainers, [(p.name, n) for p, n in zip(rollout, counts, strict=True)]))
    return found


def sweep(cfg: Config) -> list[Result]:
    """Every (pool split, max_staleness) of the config's sweep."""
    return [simulate(cfg, k, split) for split in splits(cfg) for k in cfg.simulate.staleness_sweep]


# calibration ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Measured:
    """Per-stage costs of a real run, from its metrics.jsonl (steps 2..N: step 1 holds engine warm-up)."""

    run_dir: str
    cfg: Config
    samples_per_s: float
    trainer_wait_seconds: float  # mean per step
    train_tokens_per_s: float  # response tokens per second of trainer compute (forward, backward, optimizer)
    sync_seconds: float  # mean per step
    step_overhead_s: float  # mean per step of step_seconds - wait - compute - sync; may come out negative
    response_tokens_mean: float
    decode_tokens_per_s: float  # the engines' sampled tokens per busy second (rollout_decode_by_worker)
    decode_busy_seconds: float  # engine busy seconds those tokens took, all workers
    stage_group_s: float  # stages.*: their busy seconds per group (NAME_stage_busy_s / NAME_stage_rows); 0 without
    step_seconds: float  # mean per step
    steps: int


@dataclass(frozen=True, slots=True)
class Calibration:
    """The simulate.* costs fitted to some runs, and what the fit could not do (a fit at a bound of its range)."""

    sim: SimulateConfig
    notes: tuple[str, ...] = ()


def measure(run_dir: str | Path) -> Measured:
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(records) < 3:
        raise ValueError(f"{run_dir}: calibration needs at least 3 steps in metrics.jsonl, found {len(records)}")
    if any("rollout_decode_by_worker" not in r for r in records):
        raise ValueError(f"{run_dir}: metrics.jsonl lacks rollout_decode_by_worker (the engines' decode rate); "
                         "calibrate from a run of this version")  # fmt: skip
    steady = records[1:]
    tokens = [r["samples_trained"] * r["response_tokens_mean"] for r in steady]
    compute = [t / r["train_tokens_per_s"] for t, r in zip(tokens, steady, strict=True)]
    overhead = [
        r["step_seconds"] - r["trainer_wait_seconds"] - c - r["sync_seconds"]
        for r, c in zip(steady, compute, strict=True)
    ]
    decode_tokens, decode_busy = _decode_deltas(records)
    cfg = load_config(run_dir / "config.yaml")
    if decode_busy <= 0:
        raise ValueError(f"{run_dir}: rollout_decode_by_worker shows no engine busy time over steps 2..{len(records)}")
    return Measured(
        run_dir=str(run_dir),
        cfg=cfg,
        samples_per_s=sum(r["samples_trained"] for r in steady) / sum(r["step_seconds"] for r in steady),
        trainer_wait_seconds=sum(r["trainer_wait_seconds"] for r in steady) / len(steady),
        train_tokens_per_s=sum(tokens) / sum(compute),
        sync_seconds=sum(r["sync_seconds"] for r in steady) / len(steady),
        step_overhead_s=sum(overhead) / len(overhead),
        response_tokens_mean=sum(tokens) / sum(r["samples_trained"] for r in steady),
        decode_tokens_per_s=decode_tokens / decode_busy,
        decode_busy_seconds=decode_busy,
        stage_group_s=_stage_group_seconds(records[0], records[-1], cfg.rollout.group_size),
        step_seconds=sum(r["step_seconds"] for r in steady) / len(steady),
        steps=len(records),
    )


def _decode_deltas(records: list[dict]) -> tuple[float, float]:
    """Tokens sampled and busy seconds of all rollout workers from the end of step 1 to the last step. The counters
    are cumulative per worker; a restarted worker counts from zero again, so a fall is a restart."""
    tokens = busy = 0.0
    for before, now in itertools.pairwise(records):
        for name, counters in now["rollout_decode_by_worker"].items():
            then = before["rollout_decode_by_worker"].get(name, {"tokens": 0, "busy_seconds": 0.0})
            restarted = counters["tokens"] < then["tokens"] or counters["busy_seconds"] < then["busy_seconds"]
            tokens += counters["tokens"] - (0 if restarted else then["tokens"])
            busy += counters["busy_seconds"] - (0.0 if restarted else then["busy_seconds"])
    return tokens, busy


def _stage_group_seconds(first: dict, last: dict, group_size: int) -> float:
    """Seconds the pipeline stages (stages.*) spend on one group between the engine and the trainer, from their
    cumulative busy seconds and rows over steps 2..N, summed over the stages (a group passes each in turn)."""
    seconds = 0.0
    for key in last:
        if key.endswith("_stage_busy_s"):
            rows = last[key.removesuffix("_busy_s") + "_rows"] - first.get(key.removesuffix("_busy_s") + "_rows", 0)
            if rows > 0:
                seconds += (last[key] - first.get(key, 0.0)) / rows * group_size
    return seconds


def as_run(measured: Measured, sim: SimulateConfig) -> Config:
    """The measured run's own config with ``sim``'s costs, simulated for as many steps as it ran."""
    return dataclasses.replace(measured.cfg, simulate=dataclasses.replace(sim, steps=measured.steps, calibrate_from=[]))


def calibrate(sim: SimulateConfig, runs: list[Measured]) -> Calibration:
    """``sim`` with the runs' measured costs: training tokens/s, sync seconds, step overhead and mean response
    length as measured; ``engine_step_s`` such that the simulated engines decode at the measured tokens per busy
    second (at ``engine_seq_share``); ``trainer_group_s`` (the trainer's handling of a group, which its wait metric
    includes and no metric separates) fitted so the simulated trainer wait matches the measured one; ``reward_s``
    the pipeline stages' measured seconds per group (0 without stages; the store hand-off is in the fitted cost).
    Pooled over ``runs``."""
    notes = []
    overhead = sum(m.step_overhead_s for m in runs) / len(runs)
    if overhead < 0:
        notes.append(f"step_overhead_s measured {overhead:.4g} s/step (< 0: the parts overlap); using 0")
    trained = [m.response_tokens_mean * m.cfg.samples_per_step * (m.steps - 1) for m in runs]  # tokens, steps 2..N
    calibrated = dataclasses.replace(
        sim,
        train_tokens_per_s=sum(trained) / sum(t / m.train_tokens_per_s for t, m in zip(trained, runs, strict=True)),
        sync_latency_s=sum(m.sync_seconds for m in runs) / len(runs),
        model_gb=0.0,
        step_overhead_s=max(0.0, overhead),
        response_length="fixed",
        length_median=sum(m.response_tokens_mean for m in runs) / len(runs),
        reward_s=sum(m.stage_group_s for m in runs) / len(runs),
    )
    decode = sum(m.decode_tokens_per_s * m.decode_busy_seconds for m in runs) / sum(m.decode_busy_seconds for m in runs)
    for _ in range(2):  # the trainer's pace shifts how many sequences run together, and so the decode rate
        calibrated, engine_note = _fit_engine_step(calibrated, runs, decode)
        calibrated, wait_note = _fit_trainer_group(calibrated, runs)
    notes += [note for note in (engine_note, wait_note) if note]
    return Calibration(calibrated, tuple(notes))


def _fit_engine_step(sim: SimulateConfig, runs: list[Measured], decode: float) -> tuple[SimulateConfig, str]:
    """``engine_step_s`` whose simulated decode rate (busy-weighted over ``runs``) is ``decode`` tokens/s: the rate
    scales as 1 / engine_step_s at a given batch, so a few fixed-point passes settle it."""
    weights = [m.decode_busy_seconds for m in runs]
    for _ in range(30):
        rates = [simulate(as_run(m, sim)).decode_tokens_per_s for m in runs]
        simulated = sum(r * w for r, w in zip(rates, weights, strict=True)) / sum(weights)
        if simulated <= 0:
            return sim, "engine_step_s not fitted: the simulated engines never ran in steps 2..N"
        sim = dataclasses.replace(sim, engine_step_s=sim.engine_step_s * simulated / decode)
        if abs(simulated / decode - 1) < 1e-4:
            return sim, ""
    return sim, f"engine_step_s fit did not settle: last simulated decode rate {simulated:.4g} vs measured {decode:.4g}"


def _fit_trainer_group(sim: SimulateConfig, runs: list[Measured]) -> tuple[SimulateConfig, str]:
    """``trainer_group_s`` in [0, the longest mean step per group] whose simulated trainer wait (summed over ``runs``)
    matches the measured one, by bisection (the wait grows with it); a target outside the range ends at the bound,
    said so. Where 0 already matches (within 0.1% of a step), it is 0."""
    measured = sum(m.trainer_wait_seconds for m in runs)
    tolerance = 1e-3 * sum(m.step_seconds for m in runs)

    def waited(trainer_group_s: float) -> float:
        trial = dataclasses.replace(sim, trainer_group_s=trainer_group_s)
        return sum(simulate(as_run(m, trial)).trainer_wait_seconds for m in runs)

    low, high = 0.0, max(m.step_seconds / m.cfg.trainer.prompts_per_step for m in runs)
    at_low, at_high = waited(low), waited(high)
    per_step = f"measured {measured / len(runs):.4g} s/step"
    if at_low >= measured - tolerance:
        note = f"trainer_group_s at its lower bound 0: the simulated trainer wait {at_low / len(runs):.4g} s/step > "
        return dataclasses.replace(sim, trainer_group_s=low), note + per_step if at_low > measured + tolerance else ""
    if at_high < measured:
        note = f"trainer_group_s at its upper bound {high:.4g}: the simulated trainer wait {at_high / len(runs):.4g} "
        return dataclasses.replace(sim, trainer_group_s=high), note + f"s/step < {per_step}"
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if waited(middle) < measured else (low, middle)
    return dataclasses.replace(sim, trainer_group_s=(low + high) / 2), ""


# report --------------------------------------------------------------------------------------
def report(cfg: Config) -> str:
    """The text `asyncrl simulate` prints: calibration (if any) with its check against the runs, then the sweep."""
    lines = []
    if cfg.simulate.calibrate_from:
        runs = [measure(path) for path in cfg.simulate.calibrate_from]
        pooled = calibrate(cfg.simulate, runs)
        cfg = dataclasses.replace(cfg, simulate=pooled.sim)
        lines += _calibration_lines(cfg.simulate, runs, pooled)
    sim = cfg.simulate
    length = (
        f"fixed {sim.length_median or cfg.rollout.max_new_tokens:g}"
        if sim.response_length == "fixed"
        else f"lognormal(median {sim.length_median or cfg.rollout.max_new_tokens:g}, sigma {sim.length_sigma:g})"
    )
    lines.append(
        f"pipeline: {cfg.trainer.prompts_per_step} x {cfg.rollout.group_size} samples/step, response length "
        f"{length} cut at {cfg.rollout.max_new_tokens}, {sim.steps} steps"
    )
    header = f"{'trainers':>8} {'rollouts':>8} {'k':>3} {'samples/s':>10} {'tokens/s':>9} {'step s':>8} {'vs k=0':>7} "
    header += f"{'trainer idle':>12} {'rollout idle':>12} {'stale mean':>10} {'max':>4} {'dropped':>7}"
    lines.append(header)
    results = sweep(cfg)
    baselines = {(r.trainers, r.rollouts): r.samples_per_s for r in results if r.max_staleness == 0}
    for r in results:
        base = baselines.get((r.trainers, r.rollouts))
        speedup = f"{r.samples_per_s / base:.2f}x" if base else "-"
        lines.append(
            f"{r.trainers:>8} {r.rollouts:>8} {r.max_staleness:>3} {r.samples_per_s:>10.3f} {r.tokens_per_s:>9.0f} "
            f"{r.step_seconds:>8.2f} "
            f"{speedup:>7} {r.trainer_idle:>12.2f} {r.rollout_idle:>12.2f} {r.staleness_mean:>10.2f} "
            f"{r.staleness_max:>4} {r.dropped_groups:>7}"
        )
    best_sync = max(baselines.values()) if baselines else None
    if best_sync:
        best = max(results, key=lambda r: r.samples_per_s)
        lines.append(
            f"best: {best.trainers} trainers, {best.rollouts} rollouts, max_staleness={best.max_staleness}: "
            f"{best.samples_per_s:.3f} samples/s = {best.samples_per_s / best_sync:.2f}x the best synchronous split"
        )
    return "\n".join(lines)


def _calibration_lines(sim: SimulateConfig, runs: list[Measured], pooled: Calibration) -> list[str]:
    """The fitted costs, what the fit could not do, and each run's real samples/s against the prediction (with
    several runs also from that run's own calibration alone: runs on a shared machine see different loads)."""
    decode = sum(m.decode_tokens_per_s * m.decode_busy_seconds for m in runs) / sum(m.decode_busy_seconds for m in runs)
    lines = [
        f"calibrated from {len(runs)} run(s): engine_step_s={sim.engine_step_s:.4g} (measured decode "
        f"{decode:.4g} tokens/s per busy engine) trainer_group_s={sim.trainer_group_s:.4g} (fitted to the wait) "
        f"reward_s={sim.reward_s:.4g} (stages, measured) "
        f"train_tokens_per_s={sim.train_tokens_per_s:.4g} sync_latency_s={sim.sync_latency_s:.4g} "
        f"step_overhead_s={sim.step_overhead_s:.4g} length_median={sim.length_median:.4g}",
        *(f"  note: {note}" for note in pooled.notes),
    ]
    for m in runs:
        predicted = simulate(as_run(m, sim)).samples_per_s
        line = (
            f"  {m.run_dir} (max_staleness={m.cfg.scheduler.max_staleness}): real {m.samples_per_s:.2f} "
            f"samples/s, predicted {predicted:.2f} ({100 * (predicted / m.samples_per_s - 1):+.1f}%)"
        )
        if len(runs) > 1:
            alone = calibrate(sim, [m])
            predicted = simulate(as_run(m, alone.sim)).samples_per_s
            line += f"; from this run alone {predicted:.2f} ({100 * (predicted / m.samples_per_s - 1):+.1f}%)"
            line += "".join(f" [{note}]" for note in alone.notes)
        lines.append(line)
    return lines
