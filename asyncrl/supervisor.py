"""Keeping a run's workers alive: the fault boundary between the driver and its actors.

- A rollout worker whose process died is restarted by Ray (``run.max_restarts``); ``check`` notices the
  new process, hands it the weights its peers hold (``weight_sync.rejoin``) and starts it again, and the
  worker takes back the prompt entries its dead process held (same consumer name).
- A rollout worker that hangs (stopped, deadlocked: its process lives but does not answer) is killed so that Ray
  restarts it, and then brought back the same way. It is caught by whichever waits on it first: a weight sync that
  it does not finish within ``sync.timeout_s`` (``EnginesHung``, naming the pool, the engine and the bucket), or a
  ``status`` call it leaves unanswered for ``sync.timeout_s`` while Ray reports its process alive (not restarting).
- A trainer whose process died ends the run (``trainer_lost``) with the newest checkpoint to resume from.

The pids of the run's processes are in ``run.dir/processes.json`` (rewritten on every restart), for
operators and the fault tests.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asyncrl.config import Config

log = logging.getLogger(__name__)

PROCESSES = "processes.json"
RETRY_S = 0.5
START_TIMEOUT_S = 60.0


class WorkerLost(RuntimeError):
    """A worker of the run died and cannot be brought back; the message says what is left to do."""


def worker_names(trainers: list, rollouts: list) -> list[str]:
    """``trainer-<rank>`` then ``rollout-<i>``: the workers' names in processes.json and the memory metrics."""
    return [*[f"trainer-{rank}" for rank in range(len(trainers))], *[f"rollout-{i}" for i in range(len(rollouts))]]


class Supervisor:
    """The driver's watch over the trainer ranks and the rollout workers (see the module docstring)."""

    def __init__(
        self, cfg: Config, trainers: list, rollouts: list, weight_sync: Any, run_dir: Path | None, redis_pid: int | None
    ) -> None:
        import ray

        self.cfg, self.trainers, self.rollouts, self.weight_sync = cfg, trainers, rollouts, weight_sync
        self.run_dir = run_dir
        self.restarts = [0] * len(rollouts)
        """Restarts of each rollout worker so far."""
        self.hangs = 0
        """Rollout workers killed as hung so far (``kill_hung``)."""
        self._killed: dict[int, int] = {}
        """Worker index -> the pid ``kill_hung`` killed (Ray takes seconds to end a stopped process)."""
        self.store_restarts = 0
        """Restarts of the embedded store server seen so far (``follow_store``)."""
        reports = ray.get([w.memory.remote() for w in [*trainers, *rollouts]], timeout=30)
        names = worker_names(trainers, rollouts)
        self.pids = {"driver": os.getpid(), **{name: int(r["pid"]) for name, r in zip(names, reports, strict=True)}}
        if redis_pid is not None:
            self.pids["redis"] = redis_pid
        self._write_processes()

    def kill_hung(self, indices: list[int], why: str) -> None:
        """Kill the rollout workers ``indices`` (hung: ``why``) so that Ray restarts them; ``check`` brings them
        back. With their restarts used up the run ends (``WorkerLost``)."""
        import ray

        for index in indices:
            name = f"rollout-{index}"
            if self._killed.get(index) == self.pids[name]:
                continue  # killed already; Ray has not ended that process yet
            if self.restarts[index] >= self.cfg.run.max_restarts:
                raise WorkerLost(
                    f"rollout worker {name} (pid {self.pids[name]}) hung ({why}) and is not restarted: "
                    f"run.max_restarts={self.cfg.run.max_restarts} restarts are used up"
                )
            log.warning(
                "rollout worker %s (pid %d) hung: %s; killing it so Ray restarts it", name, self.pids[name], why
            )
            ray.kill(self.rollouts[index], no_restart=False)
            self._killed[index] = self.pids[name]
            self.hangs += 1

    def sync(self, version: int) -> float:
        """``weight_sync.sync(version)``; returns its seconds. Engines it finds hung (``EnginesHung``) are killed,
        brought back once Ray restarted them (``check``: re-synced, their prompt entries taken back), and the sync
        runs again so that every engine holds ``version``. Waits on: the syncs and the restarts (``check``)."""
        from asyncrl.weight_sync import EnginesHung

        tic = time.monotonic()
        try:
            self.weight_sync.sync(version)
        except EnginesHung as err:
            self.kill_hung(err.engines, str(err))
            self.check()
            self.weight_sync.sync(version)
        return time.monotonic() - tic

    def check(self) -> list[int]:
        """Fail on a rollout worker whose loop stopped with an error; bring back each one whose process died
        and was restarted; returns the indices brought back.

        Waits on: every worker's ``status``. A worker Ray is restarting answers once its engine is up again;
        one that stays silent for ``run.step_timeout_s`` (hung, or a restart that never finishes) fails the run.
        """
        refs = [worker.status.remote() for worker in self.rollouts]
        back = []
        for index, ref in enumerate(refs):
            status = self._status(index, ref)
            if status["error"] is not None:
                raise RuntimeError(f"rollout worker rollout-{index} failed: {status['error']}")
            if not status["started"] or status["pid"] != self.pids[f"rollout-{index}"]:
                self._bring_back(index, status["pid"])
                back.append(index)
        return back

    @contextmanager
    def watch_trainer(self, step: int) -> Iterator[None]:
        """Around optimizer step ``step`` and what follows it (sync, logs, checkpoint): the death of the trainer's
        process in there raises ``WorkerLost`` naming the checkpoint to resume from (``trainer_lost``)."""
        try:
            yield
        except Exception as err:
            if (lost := self.trainer_lost(step, err)) is None:
                raise
            raise lost from err

    def trainer_lost(self, step: int, err: BaseException) -> WorkerLost | None:
        """If ``err`` says the trainer's process died: the error that ends the run, naming the newest complete
        checkpoint to resume from; else None (another actor's error, or not an actor's)."""
        import ray

        if not isinstance(err, ray.exceptions.RayActorError):
            return None
        ranks = [t._actor_id.hex() for t in self.trainers]
        if err.actor_id is not None and err.actor_id not in ranks:
            return None
        name = f"trainer-{ranks.index(err.actor_id) if err.actor_id is not None else 0}"
        from asyncrl.checkpoint import list_checkpoints

        found = list_checkpoints(self.run_dir) if self.run_dir is not None else []
        if found:
            where = f"resume from the newest checkpoint: asyncrl ckpt resume {found[-1].path} (step {found[-1].step})"
        else:
            where = "no checkpoint was written yet (run.checkpoint_every), so the run must start over"
        return WorkerLost(f"the trainer ({name}, pid {self.pids[name]}) died at optimizer step {step + 1}; {where}")

    def _status(self, index: int, ref: Any) -> dict:
        """Worker ``index``'s ``status()``, through a restart of its actor."""
        import ray

        name, limit, hang_s = f"rollout-{index}", self.cfg.run.step_timeout_s, self.cfg.sync.timeout_s
        silent_since = time.monotonic()
        deadline = silent_since + limit
        while True:
            try:
                return ray.get(ref, timeout=max(RETRY_S, min(deadline, silent_since + hang_s) - time.monotonic()))
            except ray.exceptions.GetTimeoutError as err:
                now = time.monotonic()
                killed = self._killed.get(index) == self.pids[name]
                if now - silent_since >= hang_s and not killed and self._alive_in(index, self.pids[name]):
                    self.kill_hung([index], f"no answer to a status call for {hang_s:g}s (sync.timeout_s)")
                    silent_since, deadline = now, now + limit  # its restart gets run.step_timeout_s from here
                    continue
                if now > deadline:
                    raise WorkerLost(
                        f"rollout worker {name} (pid {self.pids[name]}) did not answer for {limit:g}s "
                        "(run.step_timeout_s): its restart did not finish"
                    ) from err
                continue  # restarting (Ray answers once its engine is up): keep waiting on the same call
            except ray.exceptions.RayActorError as err:
                if self.restarts[index] >= self.cfg.run.max_restarts:
                    raise WorkerLost(
                        f"rollout worker {name} (pid {self.pids[name]}) died and is not restarted: "
                        f"run.max_restarts={self.cfg.run.max_restarts} restarts are used up"
                    ) from err
                if time.monotonic() > deadline:
                    raise WorkerLost(
                        f"rollout worker {name} (pid {self.pids[name]}) did not answer for {limit:g}s "
                        "(run.step_timeout_s): its restart did not finish"
                    ) from err
            time.sleep(RETRY_S)  # died just now: Ray has not begun the restart that the next call waits for
            ref = self.rollouts[index].status.remote()

    def _alive_in(self, index: int, pid: int) -> bool:
        """Whether Ray reports worker ``index``'s actor alive in process ``pid`` (so a silence is a hang, not a
        restart). Asks the GCS, not the worker, which may not answer."""
        from ray._private import state  # the public state API needs the dashboard, which the run leaves off

        info = state.actors(self.rollouts[index]._actor_id.hex())
        return info.get("State") == "ALIVE" and info.get("Pid") == pid

    def _bring_back(self, index: int, pid: int) -> None:
        """Worker ``index`` runs in a new process: give it its peers' weights, then start it (it takes back its
        prompts). Waits on the weight load (``sync.timeout_s``) and the start."""
        import ray

        name = f"rollout-{index}"
        self.restarts[index] += 1
        log.warning("rollout worker %s is back in pid %d (was %d; restart %d of run.max_restarts=%d)",
                    name, pid, self.pids[name], self.restarts[index], self.cfg.run.max_restarts)  # fmt: skip
        self.weight_sync.rejoin(index)
        reclaimed = ray.get(self.rollouts[index].start.remote(), timeout=START_TIMEOUT_S)
        log.warning("rollout worker %s took back %d prompt entries its dead process held", name, reclaimed)
        self.pids[name] = pid
        self._write_processes()

    def follow_store(self, pid: int) -> int:
        """The embedded store server now runs in ``pid``: its keeper (storage/keeper.py) restarts a killed one in a
        new process, which processes.json then names; returns the store restarts seen so far (one per pid change,
        so two restarts between two calls count once; the keeper's log has each)."""
        if pid != self.pids.get("redis", pid):
            self.store_restarts += 1
            self.pids["redis"] = pid
            self._write_processes()
        return self.store_restarts

    def _write_processes(self) -> None:
        if self.run_dir is None:
            return
        tmp = self.run_dir / (PROCESSES + ".tmp")
        tmp.write_text(json.dumps(self.pids, indent=1) + "\n")
        tmp.replace(self.run_dir / PROCESSES)
