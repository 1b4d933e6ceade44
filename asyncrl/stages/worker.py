"""``StageWorker``: the Ray actor that runs one pipeline stage as a consumer of the store, and ``StageSet``, the
driver's handle on the run's stages."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from asyncrl.config import Config, StagesConfig
from asyncrl.types import Streams

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500  # one bounded wait for new entries; the loop checks for stop between two
CHECK_EVERY_S = 1.0  # the driver asks the stages for their health at most this often
MAX_FAILED_IN_A_ROW = 3  # a stage that raises on this many entries in a row is broken, not fed one bad entry


class StageBroken(RuntimeError):
    """A stage raised on ``MAX_FAILED_IN_A_ROW`` entries in a row: the run ends with its last error."""


def stage_names(cfg: StagesConfig) -> list[str]:
    """The stages a run has, by consumer group name: ``reward`` and/or ``reference``."""
    return [name for name, on in (("reward", cfg.reward), ("reference", cfg.reference)) if on]


def _stage_class(name: str) -> type:
    from asyncrl.stages.reference import ReferenceStage
    from asyncrl.stages.reward import RewardStage

    return {"reward": RewardStage, "reference": ReferenceStage}[name]


class StageWorker:
    """Runs stage ``name`` on the entries of the ``generated`` stream, as consumer ``NAME-INDEX`` of group ``name``
    (several workers of one stage share its entries, each read by one of them).

    Per entry: read only the stage's columns, compute its columns, and ``advance`` the entry with them; the
    last stage to add its columns hands the entry on to ``trajectories``. The loop starts with the actor, so a
    process Ray restarts goes on by itself, and first takes back the entries its previous process read and
    never advanced (``advance`` is atomic: an entry is handed on once, whatever was retried).
    """

    def __init__(self, cfg: Config, model_path: str, store_url: str, name: str, index: int = 0) -> None:
        from storage import TrajectoryStore

        self.name, self.consumer = name, f"{name}-{index}"
        self.stage = _stage_class(name)(cfg, model_path)
        self.columns = [*self.stage.columns, "prompt_id"]  # prompt_id: to report an entry the stage raised on
        self.ready_when = [column for stage in stage_names(cfg.stages) for column in _stage_class(stage).adds]
        self.store = TrajectoryStore.from_config(store_url, cfg.run.name, cfg.store)
        self.store.ensure_group(Streams.GENERATED, name)
        self.entries = self.rows = self.failed = self.failed_in_a_row = 0
        self.busy_seconds = 0.0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stage-{name}", daemon=True)
        self._thread.start()

    def ready(self) -> str:
        return self.consumer

    def health(self) -> str | None:
        """None while the loop is alive, else the error that ended it."""
        return None if self.error is None else repr(self.error)

    def stats(self) -> dict[str, float]:
        return {"entries": self.entries, "rows": self.rows, "failed": self.failed, "busy_seconds": self.busy_seconds}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            backlog = self.store.claim_stale(
                Streams.GENERATED, self.name, self.consumer, 0, count=1000, columns=self.columns, owner=self.consumer,
            )  # fmt: skip
            if backlog:
                log.warning("%s stage took back %d entries its previous process held", self.name, len(backlog))
            self._handle(backlog)
            while not self._stop.is_set():
                self._handle(self._read())
        except BaseException as exc:  # reported through health(): the driver ends the run with it
            log.exception("%s stage failed", self.name)
            self.error = exc

    def _read(self) -> list:
        return self.store.read(
            Streams.GENERATED, self.name, self.consumer, count=4, block_ms=READ_BLOCK_MS, columns=self.columns
        )

    def _handle(self, entries: list) -> None:
        for entry in entries:
            tic = time.monotonic()
            try:
                columns = self.stage(entry.table)
            except Exception as exc:  # the fault boundary of one entry; the store's own errors end the loop
                self._set_aside(entry, exc)
                continue
            self.failed_in_a_row = 0
            self.store.advance(
                Streams.GENERATED, self.name, entry.id, Streams.TRAJECTORIES, columns, ready_when=self.ready_when
            )
            self.busy_seconds += time.monotonic() - tic
            self.entries += 1
            self.rows += entry.table.num_rows

    def _set_aside(self, entry: Any, exc: Exception) -> None:
        """Move an entry the stage raised on to the dead-letter stream (with the error, for ``asyncrl store``) and
        report each of its groups as dropped, so the scheduler frees their slots and, with
        ``scheduler.on_stale=regenerate``, issues those prompts again; the run goes on. Raises ``StageBroken``
        once ``MAX_FAILED_IN_A_ROW`` entries in a row failed."""
        import pyarrow as pa

        self.failed += 1
        self.failed_in_a_row += 1
        reason = f"{self.name} stage raised {type(exc).__name__}: {exc}"
        if self.failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            raise StageBroken(f"{reason} (and on the {MAX_FAILED_IN_A_ROW - 1} entries before it)") from exc
        log.error("%s stage: entry %s set aside: %s", self.name, entry.id, reason)
        self.store.dead_letter(Streams.GENERATED, self.name, entry.id, reason)
        prompts = dict.fromkeys(entry.table.column("prompt_id").to_pylist())
        tables = [pa.table({"prompt_id": [prompt]}) for prompt in prompts]
        self.store.put_many(Streams.DROPPED, tables, [{"stage": self.name, "reason": reason}] * len(tables))


class StageSet:
    """The driver's handle on the run's stage workers: start, health checks (throttled), metrics, stop."""

    def __init__(self, cfg: Config, handles: dict[str, Any]) -> None:
        self.cfg, self.handles = cfg, handles
        self._checked = 0.0

    @classmethod
    def launch(cls, cfg: Config, model_path: str, store_url: str) -> StageSet:
        """One ``StageWorker`` per stage of ``cfg.stages`` (none: an empty set). They take no CPU slot of the
        placement; the reference stage takes a GPU when ``stages.device`` is a CUDA device. Ray restarts one
        whose process died (``run.max_restarts``)."""
        import ray

        handles = {}
        for name in stage_names(cfg.stages):
            gpus = 1 if name == "reference" and cfg.stages.device.startswith("cuda") else 0
            for index in range(cfg.stages.reward_workers if name == "reward" else 1):
                handles[f"{name}-{index}"] = (
                    ray.remote(StageWorker)
                    .options(name=f"stage-{name}-{index}", num_cpus=0, num_gpus=gpus, max_concurrency=2,
                             max_restarts=cfg.run.max_restarts)
                    .remote(cfg, model_path, store_url, name, index)
                )  # fmt: skip
        ray.get([handle.ready.remote() for handle in handles.values()], timeout=cfg.run.step_timeout_s)
        return cls(cfg, handles)

    def check(self, force: bool = False) -> None:
        """Raise with the stage's error when one failed (a dead process is Ray's to restart)."""
        import ray

        if not self.handles or (not force and time.monotonic() - self._checked < CHECK_EVERY_S):
            return
        self._checked = time.monotonic()
        names = list(self.handles)
        errors = ray.get([self.handles[name].health.remote() for name in names], timeout=60)
        for name, error in zip(names, errors, strict=True):
            if error is not None:
                raise RuntimeError(f"stage worker {name} failed: {error}")

    def record(self) -> dict[str, float]:
        """Per stage, summed over its workers since start: busy seconds (``NAME_stage_busy_s``), rows it
        handled (``NAME_stage_rows``) and entries it raised on and set aside (``NAME_stage_failed``)."""
        import ray

        names = list(self.handles)
        stats = ray.get([self.handles[name].stats.remote() for name in names], timeout=60)
        out: dict[str, float] = {}
        for name, stat in zip(names, stats, strict=True):
            stage = name.rpartition("-")[0]
            out[f"{stage}_stage_busy_s"] = round(out.get(f"{stage}_stage_busy_s", 0.0) + stat["busy_seconds"], 3)
            out[f"{stage}_stage_rows"] = out.get(f"{stage}_stage_rows", 0) + stat["rows"]
            out[f"{stage}_stage_failed"] = out.get(f"{stage}_stage_failed", 0) + stat["failed"]
        return out

    def stop(self) -> None:
        import ray

        ray.get([handle.stop.remote() for handle in self.handles.values()], timeout=60)
