"""The run loop: issue prompts under admission control, train a step, sync weights, log.

Rollout workers generate continuously in their own actors; the trainer pulls scored groups
from the store as they arrive. The driver only decides how many prompts may be in flight
(the staleness bound), waits for each optimizer step, and moves the new weights.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncrl.config import Config, to_yaml
from asyncrl.data import build_prompt_source, prompt_index, tokenized_prompts
from asyncrl.metrics import RunWriter, plot_run, prepare_run_dir, wandb_options
from asyncrl.progress import step_progress
from asyncrl.ranks import merge_step_results, rendezvous_address
from asyncrl.resume import Resume, purge_store, restore_groups, truncate_run_logs
from asyncrl.runtime import ray_session, store_server
from asyncrl.scheduler import Scheduler
from asyncrl.stages import StageSet
from asyncrl.stop import StopSignals
from asyncrl.supervisor import Supervisor, worker_names
from asyncrl.types import PROMPT_SCHEMA, Groups, Streams, table_from_rows
from asyncrl.weight_sync import build_weight_sync

log = logging.getLogger(__name__)

POLL_S = 0.2


def train(cfg: Config, resume: Resume | None = None, stop: StopSignals | None = None) -> Path:
    """Run optimizer steps up to ``cfg.run.steps``; returns the run folder. With ``resume``, from the step after
    its checkpoint, in the checkpoint's run folder (logs cut back to it, the run's store keys purged). A ``stop``
    request (SIGTERM/SIGINT) writes a checkpoint at the next step boundary and ends the run there."""
    from asyncrl.models import resolve_model_path

    model_path = str(resolve_model_path(cfg.model.path))
    prompts = build_prompt_source(cfg.data)  # a bad data file fails here, before anything starts
    if resume is None:
        run_dir = prepare_run_dir(Path(cfg.run.dir), overwrite=cfg.run.overwrite)
    else:
        run_dir = resume.run_dir
        truncate_run_logs(run_dir, resume.step, resume.version)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    purge_step = None if resume is None else resume.step + 1  # TensorBoard: forget the steps logged after it
    with (
        store_server(cfg, run_dir) as url,
        ray_session(cfg),
        RunWriter(run_dir, wandb_options(cfg), purge_step) as writer,
    ):
        if stop is not None:
            stop.install()  # again: ray.init replaces the driver's SIGTERM handler with its own
        if resume is not None:
            purge_store(cfg, url)
        _loop(cfg, model_path, prompts, url, writer, resume, stop)
    plot_run(run_dir)
    return run_dir


def _loop(cfg: Config, model_path: str, prompts, url: str, writer: RunWriter, resume=None, stop=None) -> None:
    pipeline = Pipeline.launch(cfg, model_path, prompts, url, writer.run_dir)
    if resume is None:
        scheduler, first = Scheduler(cfg.scheduler, cfg.trainer.prompts_per_step), 0
    else:
        scheduler, first = pipeline.restore(resume), resume.step
    with step_progress(cfg.run.steps, enabled=cfg.run.progress, done=first) as progress:
        for step in range(first, cfg.run.steps):
            with pipeline.supervisor.watch_trainer(step):  # its death ends the run naming the checkpoint
                record, ledger = pipeline.step(step, scheduler)
                record.update(_process_memory(pipeline.trainers, pipeline.rollouts, pipeline.redis_pid))
                writer.log_samples(ledger)
                writer.log_step(record)
                progress.advance(record)
                every, stopping = cfg.run.checkpoint_every, stop is not None and stop.requested
                if stopping or (every and ((step + 1) % every == 0 or step + 1 == cfg.run.steps)):
                    scheduler.on_dropped(_read_dropped(pipeline.store))  # drops reported in the step's last poll
                    _save_checkpoint(cfg, writer.run_dir, step + 1, scheduler, pipeline.trainers)
                if stopping:
                    log.warning("stopped by %s after step %d", stop.received.name, step + 1)
                    break
    pipeline.stop()


def _save_checkpoint(cfg: Config, run_dir: Path, step: int, scheduler: Scheduler, trainers: list) -> Path:
    """Between two steps: the trainer's DeepSpeed state, the scheduler and the config (asyncrl/checkpoint.py)."""
    import ray

    from asyncrl.checkpoint import save_checkpoint, scheduler_state

    def fill(folder: Path) -> None:
        (folder / "config.yaml").write_text(to_yaml(cfg))
        keep_groups = cfg.run.checkpoint_store == "arrow"  # the scored, untrained groups travel with it
        saves = [t.save_checkpoint.remote(str(folder), keep_groups) for t in trainers]  # collective over the ranks
        ray.get(saves, timeout=cfg.run.step_timeout_s)

    state = {"scheduler": scheduler_state(scheduler)}
    path = save_checkpoint(run_dir, step, scheduler.version, state, fill, keep=cfg.run.keep_checkpoints)
    log.info("checkpoint %s written", path)
    return path


@dataclass
class Pipeline:
    """The started workers of one run and the driver's handles on them; ``step`` runs one optimizer step.

    The run loop drives it with one ``Scheduler``; ``asyncrl bench pipeline`` drives the same workers
    with one scheduler per staleness bound (``drain`` in between)."""

    cfg: Config
    store: Any
    trainer: Any
    rollouts: list
    weight_sync: Any
    prompts: Any
    redis_pid: int | None
    idle_before: dict[str, float] = field(default_factory=dict)
    supervisor: Supervisor | None = None
    stages: StageSet | None = None
    trainers: list = field(default_factory=list)
    """Every trainer rank, ``trainer`` (rank 0) first."""

    @classmethod
    def launch(cls, cfg: Config, model_path: str, prompts, url: str, run_dir: Path | None = None) -> Pipeline:
        import ray

        from storage import TrajectoryStore

        prompts = tokenized_prompts(prompts, cfg, model_path)  # the rollout workers then get token ids
        store = TrajectoryStore.from_config(url, cfg.run.name, cfg.store)
        store.ensure_group(Streams.DROPPED, Groups.CONTROLLER)
        trainers, rollouts = _launch_workers(cfg, model_path, url)
        trainer = trainers[0]  # rank 0 sends the weights
        redis_pid = None if cfg.store.url else int(store.client.info("server")["process_id"])  # embedded: ours
        stages = StageSet.launch(cfg, model_path, url)  # stages.*: reward / reference as store consumers
        ray.get([w.start.remote() for w in rollouts], timeout=60)
        weight_sync = build_weight_sync(cfg, trainer, rollouts, url)
        supervisor = Supervisor(cfg, trainers, rollouts, weight_sync, run_dir, redis_pid)
        idle = _idle_seconds(rollouts)
        return cls(cfg, store, trainer, rollouts, weight_sync, prompts, redis_pid, idle, supervisor, stages, trainers)

    def _check(self) -> None:
        """The supervisor's check of the trainer and rollout workers, then the stages' (a failed one ends the run)."""
        self.supervisor.check()
        if self.stages is not None:
            self.stages.check()

    def step(self, step: int, scheduler: Scheduler) -> tuple[dict, list[dict]]:
        """One optimizer step under ``scheduler``, then the weight sync it asks for; (metrics record, ledger)."""
        from storage.store import LOST_REPLIES

        cfg, store = self.cfg, self.store
        tic, tokens_before = time.monotonic(), store.incr("rollout_tokens", 0)
        counts_before = (scheduler.issued, scheduler.blocked, scheduler.dropped)
        step_refs = [t.train_step.remote(scheduler.version, scheduler.cfg.max_staleness) for t in self.trainers]
        check, timeout_s = self._check, cfg.run.step_timeout_s + 60
        result = _await_step(step_refs, store, scheduler, self.prompts, self.rollouts, check, timeout_s)
        check()  # before the sync and the bookkeeping below ask the workers anything
        trained_prompts = {prompt_index(row["prompt_id"]) for row in result["ledger"]}
        scheduler.on_step(result["samples"] // cfg.rollout.group_size, result["staleness"], trained_prompts)
        sync_seconds = 0.0
        if scheduler.should_sync():
            sync_seconds = self.supervisor.sync(scheduler.version)  # a hung engine is restarted, then synced
            scheduler.on_synced()
        step_seconds = time.monotonic() - tic
        generated = store.incr("rollout_tokens", 0) - tokens_before
        record = _step_record(step, scheduler, result, sync_seconds, step_seconds, generated)
        idle_now = _idle_seconds(self.rollouts)
        record.update(_idle_record(self.idle_before, idle_now, result, step_seconds))
        self.idle_before = idle_now
        record.update(_decode_record(self.rollouts))
        record.update(zip(("admitted", "blocked", "dropped"), _deltas(scheduler, counts_before), strict=True))
        record["engine_version"] = scheduler.engine_version
        record.update(_store_upkeep(store))
        record["rollout_restarts"] = sum(self.supervisor.restarts)
        record["rollout_hangs"] = self.supervisor.hangs
        record["prompts_reclaimed"] = store.incr("prompts_reclaimed", 0)
        # Entries handed out again after a killed server cut off a read's reply (storage/delivered.py).
        record["store_lost_replies"] = store.incr(LOST_REPLIES, 0)
        if self.redis_pid is not None:  # embedded: a killed server is restarted in a new process (storage/keeper.py)
            self.redis_pid = int(store.client.info("server")["process_id"])
            record["store_restarts"] = self.supervisor.follow_store(self.redis_pid)
        if self.stages is not None:
            record.update(self.stages.record())
        return record, result["ledger"]

    def restore(self, resume: Resume) -> Scheduler:
        """Resume from a checkpoint before any prompt is issued: the trainer loads its DeepSpeed state and RNG,
        the engines get its weights (one sync to its version), and the scheduler restarts from its saved state
        with the prompts outstanding at the checkpoint first in line."""
        import ray

        folder, timeout_s = str(resume.checkpoint), self.cfg.run.step_timeout_s
        ray.get([t.load_checkpoint.remote(folder, resume.version) for t in self.trainers], timeout=timeout_s)
        kept = restore_groups(self.store, resume.checkpoint)  # run.checkpoint_store=arrow: back into the store
        scheduler = Scheduler.from_state(
            self.cfg.scheduler, self.cfg.trainer.prompts_per_step, resume.run_state["scheduler"], kept
        )
        self.supervisor.sync(scheduler.version)
        scheduler.on_synced()
        log.info("resumed from %s at policy version %d; %d groups put back, %d prompts to issue again",
                 resume.checkpoint, scheduler.version, len(kept), len(scheduler.requeued))  # fmt: skip
        self.idle_before = _idle_seconds(self.rollouts)
        return scheduler

    def drain(self, timeout_s: float = 120.0) -> None:
        """Stop issuing, let the rollout workers finish what they hold, and have the trainer acknowledge
        (untrained) every trajectory left: the next scheduler starts on an empty pipeline."""
        import ray

        deadline = time.monotonic() + timeout_s
        while (
            self.store.inflight(Streams.PROMPTS)[0]
            or self.store.inflight(Streams.GENERATED)[0]  # stages.*: groups between the rollouts and the trainer
            or not all(_loads(self.rollouts, "inflight", 0))
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout workers did not finish their prompts within {timeout_s:.0f}s")
            time.sleep(POLL_S)
        ray.get([t.discard_pending.remote() for t in self.trainers], timeout=timeout_s)
        _read_dropped(self.store)

    def stop(self) -> None:
        import ray

        ray.get([w.stop.remote() for w in self.rollouts], timeout=60)
        if self.stages is not None:
            self.stages.stop()
        self.store.release_retired()  # retention=checkpoint: the end of the run is the last checkpoint boundary


def _loads(rollouts, key: str, equal_to: float, timeout_s: float = 10.0) -> list[bool]:
    """For each rollout worker that answers within ``timeout_s``, whether its ``load()[key]`` equals ``equal_to``
    (a hung one is left out: the supervisor's ``check`` or the next sync catches it)."""
    import ray

    refs = [w.load.remote() for w in rollouts]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    return [ray.get(ref)[key] == equal_to for ref in refs if ref in done]


def _idle_seconds(rollouts, timeout_s: float = 10.0) -> dict[str, float]:
    """Each rollout worker's cumulative seconds with an empty engine, ``{"rollout-<i>": s}``."""
    import ray

    reports = ray.get([w.load.remote() for w in rollouts], timeout=timeout_s)
    return {f"rollout-{i}": report["idle_seconds"] for i, report in enumerate(reports)}


def _idle_record(before: dict[str, float], now: dict[str, float], result: dict, step_seconds: float) -> dict:
    """Idle fractions of this step: ``trainer_idle_fraction`` is the share of the step the trainer did not
    compute (waiting for data, the weight sync, the driver); ``rollout_idle_fraction`` the mean share of the
    step the rollout engines had no request, ``rollout_idle_fraction_by_worker`` each one's."""
    # A worker restarted during the step counts its idle time from zero again: it reads as never idle here.
    per_worker = {name: max(0.0, min(1.0, (now[name] - before[name]) / step_seconds)) for name in now}
    return {
        "trainer_idle_fraction": max(0.0, 1 - result["compute_seconds"] / step_seconds),
        "rollout_idle_fraction": sum(per_worker.values()) / len(per_worker),
        "rollout_idle_fraction_by_worker": {name: round(value, 4) for name, value in per_worker.items()},
    }


def _decode_record(rollouts, timeout_s: float = 10.0) -> dict:
    """``rollout_decode_by_worker``: each rollout worker's ``tokens`` sampled and ``busy_seconds`` stepping since the
    start (their change over some steps is its decode rate while it had work) and ``tokens_per_s``, its recent rate,
    which ``rollout.inflight_budget_s`` measures held work against."""
    import ray

    reports = ray.get([w.load.remote() for w in rollouts], timeout=timeout_s)
    keys = ("tokens", "busy_seconds", "tokens_per_s")
    by_worker = {f"rollout-{i}": {key: round(report[key], 3) for key in keys} for i, report in enumerate(reports)}
    return {"rollout_decode_by_worker": by_worker}


def _deltas(scheduler: Scheduler, before: tuple[int, int, int]) -> list[int]:
    """Groups admitted, polls blocked by admission while a worker was idle, and groups dropped, this step."""
    now = (scheduler.issued, scheduler.blocked, scheduler.dropped)
    return [count - then for count, then in zip(now, before, strict=True)]


def _store_upkeep(store) -> dict:
    """Trim what every consumer is done with; the store's health as step metrics.

    ``store_dead_letters`` counts entries taken out of a stage (bad payloads, too many
    deliveries, a stage that raised on them) since the start; ``store_put_wait_seconds`` is how long rollout workers have
    waited on a full trajectories stream (back-pressure) since the start.
    """
    streams = (Streams.PROMPTS, Streams.TRAJECTORIES, Streams.DROPPED)
    for stream in streams:
        store.trim(stream)
    return {
        "store_dead_letters": sum(store.dead_letter_count(stream) for stream in (*streams, Streams.GENERATED)),
        "store_inflight_mb": store.inflight(Streams.TRAJECTORIES)[1] / 2**20,
        "store_inflight_prompts": store.inflight(Streams.PROMPTS)[0],
        "store_put_wait_seconds": store.incr("put_wait_ms", 0) / 1000,
    }


def _process_memory(trainers: list, rollouts, redis_pid: int | None, timeout_s: float = 10.0) -> dict:
    """Resident memory per process of the run, in MB: ``rss_mb`` now and ``rss_peak_mb`` (VmHWM), each
    ``{"driver", "trainer-<rank>", "rollout-<i>", "redis", "ray"}``; ``redis`` only for an embedded server,
    ``ray`` is the sum over Ray's own processes (GCS, raylet, agents, idle workers)."""
    import ray

    from asyncrl.resources import process_memory_mb, ray_memory_mb

    reports = ray.get([w.memory.remote() for w in [*trainers, *rollouts]], timeout=timeout_s)
    memory = {"driver": process_memory_mb(), **dict(zip(worker_names(trainers, rollouts), reports, strict=True))}
    if redis_pid is not None:
        memory["redis"] = process_memory_mb(redis_pid)
    workers = {int(report["pid"]) for report in reports}
    memory["ray"] = ray_memory_mb(workers if redis_pid is None else workers | {redis_pid})
    return {
        "rss_mb": {name: round(m.get("rss", 0.0), 1) for name, m in memory.items()},
        "rss_peak_mb": {name: round(m.get("peak", 0.0), 1) for name, m in memory.items()},
    }


def _await_step(step_refs: list, store, scheduler: Scheduler, prompts, rollouts, check, timeout_s: float) -> dict:
    """Keep the rollout workers fed while the trainer ranks run one optimizer step; their results merged.

    Waits on: every rank's step. Meanwhile issues every prompt admission allows, frees the
    slots of groups the trainer dropped as stale, and ``check``s the rollout workers first
    (one that failed ends the run, one whose process died is brought back; ``Supervisor``).
    The trainer gives up after run.step_timeout_s itself; the deadline here catches a hang.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:  # issue first: with max_staleness 0 the step's prompts go out now, not a poll later
        if time.monotonic() > deadline:
            raise TimeoutError(f"optimizer step {scheduler.version + 1} did not finish within {timeout_s:.0f}s")
        check()  # first: a rollout worker whose process died is brought back before anything asks it
        if not _issue_prompts(store, scheduler, prompts) and any(_loads(rollouts, "inflight", 0)):
            scheduler.blocked += 1
        scheduler.on_dropped(_read_dropped(store))
        ready, _ = ray.wait(step_refs, num_returns=len(step_refs), timeout=POLL_S)
        if len(ready) == len(step_refs):
            return merge_step_results(ray.get(step_refs))
        ray.get(ready)  # a rank that failed ends the step now: the others would wait for it in their all-reduce


def _launch_workers(cfg: Config, model_path: str, url: str):
    """The trainer ranks and ``rollout.num_workers`` rollout actors, each pinned to a bundle of its pool's
    placement group (asyncrl/placement.py) with the pool's thread budget."""
    import ray

    from asyncrl.placement import reserve
    from asyncrl.rewards.reward_worker import start_reward_worker
    from rollout.worker import RolloutWorker
    from trainers.worker import TrainerWorker

    slots = reserve(cfg)
    start_reward_worker(cfg)  # reward.local_rm.worker=true: up before the rollout workers, which look it up
    trainer_slots = slots["trainer"]
    master = rendezvous_address(trainer_slots[0], cfg.run.step_timeout_s) if len(trainer_slots) > 1 else ""
    trainers = [  # data-parallel ranks (asyncrl/ranks.py); their constructors meet at `master`
        ray.remote(TrainerWorker)
        .options(**slot.actor_options(), name=f"trainer-{rank}", max_concurrency=2)  # a snapshot during a step
        .remote(slot.worker_config(cfg), model_path, url, rank, master)
        for rank, slot in enumerate(trainer_slots)
    ]
    rollouts = [  # Ray restarts a rollout worker whose process died; the Supervisor brings it back
        ray.remote(RolloutWorker)
        .options(**slot.actor_options(), max_concurrency=4, max_restarts=cfg.run.max_restarts)
        .remote(slot.worker_config(cfg), model_path, url, f"rollout-{i}")
        for i, slot in enumerate(slots["rollout"])
    ]
    ray.get([w.ready.remote() for w in [*trainers, *rollouts]], timeout=cfg.run.step_timeout_s)
    return trainers, rollouts


def _issue_prompts(store, scheduler: Scheduler, prompts) -> int:
    """Push every admissible prompt, one store entry per prompt group (all in one round trip); returns the count.
    Each rollout worker pulls entries only while it has room (rollout/worker.py ``_take_prompts``), so a faster
    worker takes more of them."""
    count = scheduler.admissible()
    if count == 0:
        return 0
    tables = []
    for index in scheduler.take(count):
        prompt = prompts[index]
        row = {
            "prompt_id": prompt.prompt_id,
            "prompt_ids": prompt.prompt_ids,  # empty from an untokenised source: the worker encodes the text
            "prompt_text": prompt.text,
            "answer": prompt.answer,
        }
        tables.append(table_from_rows([row], PROMPT_SCHEMA))
    store.put_many(Streams.PROMPTS, tables, [{"rows": 1}] * len(tables))
    return count


def _read_dropped(store) -> list[int]:
    """Prompt indices of groups dropped since the last poll: by the trainer as stale, or by a stage that raised."""
    entries = store.read(Streams.DROPPED, Groups.CONTROLLER, "driver", count=100, block_ms=0)
    if not entries:
        return []
    store.ack(Streams.DROPPED, Groups.CONTROLLER, [e.id for e in entries])
    return [prompt_index(e.table.column("prompt_id")[0].as_py()) for e in entries]


def _step_record(step, scheduler: Scheduler, result: dict, sync_seconds, step_seconds, generated) -> dict:
    rewards = [row["reward"] for row in result["ledger"] if not row["reward_failed"]]
    return {
        "step": step + 1,
        "policy_version": scheduler.version,
        "reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
        "reward_failed": len(result["ledger"]) - len(rewards),
        **_failure_counts(result["ledger"]),
        **_turn_means(result["ledger"]),
        **_component_means(result["ledger"]),
        "staleness_max": max(result["staleness"]),
        "staleness_mean": sum(result["staleness"]) / len(result["staleness"]),
        # Trained samples so far by staleness, e.g. {"0": 40, "1": 24}: the bound's whole history.
        "staleness_hist": {str(k): n for k, n in sorted(scheduler.staleness_counts.items())},
        "samples_trained": result["samples"],
        "dropped_groups": scheduler.dropped,
        "response_tokens_mean": result["tokens"] / result["samples"],
        "rollout_tokens_per_s": generated / step_seconds,
        "train_tokens_per_s": result["tokens"] / max(result["compute_seconds"], 1e-9),
        "trainer_wait_seconds": result["wait_seconds"],
        "sync_seconds": sync_seconds,
        "step_seconds": step_seconds,
        **{
            k: result[k]
            for k in ("loss", "clip_fraction", "approx_kl", "kl_ref", "ratio_mean", "entropy", "grad_norm", "lr")
            if k in result
        },
    }


def _failure_counts(ledger: list[dict]) -> dict[str, int]:
    """``reward_failed_by/<Kind>``: this step's failed samples by the failure's kind (``RewardTimeout``, ...)."""
    kinds = Counter(row.get("reward_error") or "unknown" for row in ledger if row["reward_failed"])
    return {f"reward_failed_by/{kind}": count for kind, count in sorted(kinds.items())}


def _turn_means(ledger: list[dict]) -> dict[str, float]:
    """Multi-turn runs (rollout.env): ``turns_mean`` and ``observation_tokens_mean`` per trained sample."""
    rows = [row for row in ledger if "turns" in row]
    if not rows:
        return {}
    return {key + "_mean": sum(row[key] for row in rows) / len(rows) for key in ("turns", "observation_tokens")}


def _component_means(ledger: list[dict]) -> dict[str, float]:
    """``reward/<name>``: the mean of each reward component over the samples that computed it."""
    values: dict[str, list[float]] = {}
    for row in ledger:
        for name, value in (row.get("reward_components") or {}).items():
            values.setdefault(name, []).append(value)
    return {f"reward/{name}": sum(parts) / len(parts) for name, parts in sorted(values.items())}
