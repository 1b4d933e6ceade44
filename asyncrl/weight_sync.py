"""Controller side of weight sync: move each new policy version from the trainer to every engine.

``build_weight_sync(cfg, ...)`` picks the strategy for ``sync.transport`` from ``STRATEGIES``:

- ``object_store``: the trainer's weights as one numpy dict through Ray's object store; every engine
  loads it (the original path, no plan, no group).
- ``broadcast`` / ``store``: a bucketed link per pool (``asyncrl.sync``): the trainer builds the plan
  once, publishes it to the engines with the link spec, and each sync only moves bucket payloads;
  the trainer packs bucket i+1 while bucket i is on the wire, engines stage buckets while decoding
  and switch at a step boundary (``sync.mode``).

Fault tolerance: every call is bounded by ``sync.timeout_s``. An engine whose actor died during a sync
is dropped from the pool, the group is rebuilt over the survivors (a new generation, so nobody waits on
the dead rank again) and the run goes on; ``rejoin`` adds a returned engine back. An engine that did not
finish within the timeout (hung: stopped, deadlocked) raises ``EnginesHung`` naming the pool, the engine
and the bucket, after it was dropped the same way; the controller kills it so Ray restarts it
(asyncrl/supervisor.py) and syncs again. Any other failure raises ``SyncError``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from asyncrl.config import Config
from asyncrl.sync.transport import LinkSpec, SyncError

log = logging.getLogger(__name__)

POOL = "rollout"
"""The only pool the config declares today (``rollout``); several pools need ``rollout.pools``."""

CONNECT_MARGIN_S = 10.0
"""Extra time over ``sync.timeout_s`` for the Ray round trips around a collective."""


class EnginesHung(SyncError):
    """Engines (``rollout-<i>`` indices in ``engines``) that did not finish a sync within ``sync.timeout_s``;
    the engines that did finish hold the new version."""

    def __init__(self, message: str, engines: list[int]) -> None:
        super().__init__(message)
        self.engines = engines


class ObjectStoreSync:
    """``sync.transport=object_store``: one numpy dict through Ray's object store per sync.

    The last synced dict stays in the object store (one more copy of the weights there), so an engine
    restarted mid-step gets the weights its peers hold without waiting for the trainer."""

    def __init__(self, cfg: Config, trainer: Any, rollouts: list, store_url: str) -> None:
        self.trainer, self.rollouts, self.timeout_s = trainer, rollouts, cfg.sync.timeout_s
        self.current: tuple[Any, int] | None = None
        """(weights ref, version) of the last sync; None while the engines hold the model's initial weights."""

    def sync(self, version: int) -> float:
        import ray

        tic = time.monotonic()
        weights = self.trainer.weights.remote()
        refs = [w.update_weights.remote(weights, version) for w in self.rollouts]
        done, waiting = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        hung = [refs.index(ref) for ref in waiting]
        for index, ref in enumerate(refs):
            if index in hung:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if err.actor_id != self.rollouts[index]._actor_id.hex():
                    raise  # the trainer, not this engine
                # Ray restarts it (run.max_restarts); the controller then hands it these weights (rejoin).
                log.warning("pool %s: engine rollout-%d died during the sync to version %d", POOL, index, version)
        self.current = (weights, version)  # what a restarted engine gets (rejoin), the hung ones included
        if hung:
            names = ", ".join(f"rollout-{index}" for index in hung)
            raise EnginesHung(
                f"pool {POOL}: sync to version {version} timed out after {self.timeout_s:g}s (sync.timeout_s): "
                f"engine(s) {names} did not load the weights (one object, no buckets)",
                hung,
            )
        return time.monotonic() - tic

    def rejoin(self, index: int) -> None:
        """Give engine ``index`` (restarted) the weights of the last sync; a fresh engine already holds the
        initial ones. Waits on the engine's load, at most ``sync.timeout_s``."""
        import ray

        if self.current is not None:
            weights, version = self.current
            ray.get(self.rollouts[index].update_weights.remote(weights, version), timeout=self.timeout_s)

    def close(self) -> None:
        pass


class BucketedSync:
    """``sync.transport=broadcast|store``: one planned, bucketed link from the trainer to the pool."""

    def __init__(self, cfg: Config, trainer: Any, rollouts: list, store_url: str) -> None:
        self.cfg, self.trainer, self.rollouts, self.store_url = cfg, trainer, rollouts, store_url
        self.live = list(range(len(rollouts)))
        """Indices of the engines in the current group, in rank order (rank = position + 1)."""
        self.generation = -1
        self.returning: set[int] = set()
        """Restarted engines that join the group at the next sync (the trainer is busy until its step ends)."""
        self._connect()

    def _connect(self) -> None:
        """(Re)build the pool's link over the live engines: a new generation of the group."""
        import ray

        sc, timeout = self.cfg.sync, self.cfg.sync.timeout_s + CONNECT_MARGIN_S
        self.generation += 1
        # Only the broadcast transport rendezvouses there; hosting it for the store transport costs one idle socket.
        port = ray.get(self.trainer.sync_host.remote(sc.timeout_s), timeout=timeout)
        spec = LinkSpec(
            pool=POOL,
            transport=sc.transport,
            world_size=1 + len(self.live),
            timeout_s=sc.timeout_s,
            generation=self.generation,
            port=port,
            store_url=self.store_url,
            run_id=self.cfg.run.name,
        )
        plan = ray.get(self.trainer.sync_plan.remote(POOL, self.cfg.model.dtype, sc.bucket_mb), timeout=timeout)
        self.plan_buckets = len(plan["buckets"])
        refs = [self.trainer.sync_connect.remote(spec, plan)]
        refs += [self.rollouts[i].sync_connect.remote(plan, spec, rank) for rank, i in enumerate(self.live, 1)]
        ray.get(refs, timeout=timeout)

    def sync(self, version: int) -> float:
        import ray

        tic = time.monotonic()
        if self.returning:  # a restarted engine has no link yet and its old rank is gone: a new generation
            self.live, self.returning = sorted({*self.live, *self.returning}), set()
            self._connect()
        timeout = self.cfg.sync.timeout_s + CONNECT_MARGIN_S
        send = self.trainer.sync_send.remote(version)
        receives = {i: self.rollouts[i].sync_receive.remote(version, self.cfg.sync.mode) for i in self.live}
        refs = [send, *receives.values()]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        dead, hung, errors = [], [], []
        buckets = f"version {version}, buckets 0-{self.plan_buckets - 1}"
        for index, ref in receives.items():
            if ref in waiting:
                hung.append(index)
                errors.append(f"engine rollout-{index} did not stage every bucket of {buckets} within {timeout:.0f}s")
                continue
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:
                dead.append(index)
            except ray.exceptions.RayTaskError as err:
                errors.append(str(err.cause))
        if send in waiting:
            errors.append(f"the trainer did not finish sending within {timeout:.0f}s")
        else:
            try:
                ray.get(send)
            except ray.exceptions.RayTaskError as err:
                if not dead or hung:  # a send that failed because a receiver died is expected: rebuild below
                    errors.append(str(err.cause))  # names the bucket the trainer was on
        if dead or hung:
            log.warning("pool %s: engine(s) %s died or hung during the sync to version %d; rebuilding the group "
                        "without them", POOL, [*dead, *hung], version)  # fmt: skip
            self.live = [i for i in self.live if i not in dead and i not in hung]
            if not self.live:
                raise SyncError(f"pool {POOL}: no engine finished the sync to version {version}: " + "; ".join(errors))
            self._connect()
        if hung:
            raise EnginesHung(f"pool {POOL}: sync to version {version} timed out: " + "; ".join(errors), hung)
        if errors:
            raise SyncError(f"pool {POOL}: sync to version {version} failed: " + "; ".join(errors))
        return time.monotonic() - tic

    def rejoin(self, index: int) -> None:
        """Add engine ``index`` (restarted) back to the pool: the group is rebuilt with it at the next sync,
        before the weights are sent; until then it generates with the model's initial weights (version 0)."""
        self.returning.add(index)

    def close(self) -> None:
        pass


STRATEGIES: dict[str, type] = {"object_store": ObjectStoreSync, "broadcast": BucketedSync, "store": BucketedSync}
"""Controller-side strategy per ``sync.transport``."""


def build_weight_sync(cfg: Config, trainer: Any, rollouts: list, store_url: str) -> ObjectStoreSync | BucketedSync:
    """The weight sync for ``cfg.sync.transport`` between these actors (connects bucketed links now)."""
    return STRATEGIES[cfg.sync.transport](cfg, trainer, rollouts, store_url)
