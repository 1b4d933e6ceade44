"""Controller side of weight sync: move each new policy version from the trainer to every engine.

``build_weight_sync(cfg, ...)`` picks the strategy for ``sync.transport`` from ``STRATEGIES``:

- ``object_store``: the trainer's weights as one numpy dict through Ray's object store; every engine
  loads it (the original path, no plan, no group).
- ``broadcast`` / ``store`` / ``shm``: a bucketed link per pool (``asyncrl.sync``): the trainer builds the plan
  once, publishes it to the engines with the link spec, and each sync only moves bucket payloads;
  the trainer packs bucket i+1 while bucket i is on the wire, engines stage buckets while decoding
  and switch at a step boundary (``sync.mode``). Each rollout pool (``resources.pools``) gets its own
  plan (cast to the pool's ``dtype``, buckets of its ``sync_bucket_mb``) and its own transport
  (``sync_transport``); both default to ``model.dtype`` and ``sync.*``.

Fault tolerance: every call is bounded by ``sync.timeout_s``. An engine whose actor died during a sync
is dropped from its pool, that pool's group is rebuilt over the survivors (a new generation, so nobody
waits on the dead rank again) and the run goes on; a pool left with no engine is not sent to until one
returns, and ``rejoin`` adds a returned engine back to its pool. An engine that did not finish within
the timeout (hung: stopped, deadlocked) raises ``EnginesHung`` naming the pool, the engine and the
bucket, after it was dropped the same way; the controller kills it so Ray restarts it
(asyncrl/supervisor.py) and syncs again. Any other failure raises ``SyncError``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from asyncrl.config import Config
from asyncrl.sync.registry import TRANSPORTS
from asyncrl.sync.transport import LinkSpec, SyncError

log = logging.getLogger(__name__)

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
        self.pool_of = {index: link.name for link in pool_links(cfg) for index in link.engines}
        """Engine index -> its pool's name, for errors (every pool gets the same float32 dict here)."""
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
                log.warning("pool %s: engine rollout-%d died during the sync to version %d", self.pool_of.get(index),
                            index, version)  # fmt: skip
        self.current = (weights, version)  # what a restarted engine gets (rejoin), the hung ones included
        if hung:
            pools = ", ".join(sorted({str(self.pool_of.get(index)) for index in hung}))
            names = ", ".join(f"rollout-{index}" for index in hung)
            raise EnginesHung(
                f"pool {pools}: sync to version {version} timed out after {self.timeout_s:g}s (sync.timeout_s): "
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


@dataclass(slots=True)
class PoolLink:
    """One rollout pool's end of the bucketed sync: its engines, the plan settings and transport it gets."""

    name: str
    engines: list[int]
    """Indices (``rollout-<i>``) of the pool's engines in the run's list of rollout workers."""
    dtype: str
    """The pool's engine dtype (``resources.pools[i].dtype``, else ``model.dtype``): the plan casts to it."""
    transport: str
    """``resources.pools[i].sync_transport``, else ``sync.transport``."""
    bucket_mb: float
    """``resources.pools[i].sync_bucket_mb``, else ``sync.bucket_mb``."""
    tensor_parallel: int = 1
    """``resources.pools[i].tensor_parallel``: the plan gives each of the engine's TP ranks its own shards."""
    live: list[int] = field(default_factory=list)
    """The engines in the current group, in rank order (rank = position + 1)."""
    generation: int = -1
    returning: set[int] = field(default_factory=set)
    """Restarted engines that join the group at the next sync (the trainer is busy until its step ends)."""
    plan_buckets: int = 0


def pool_links(cfg: Config) -> list[PoolLink]:
    """A link per rollout pool, with the pool's overrides resolved; engine indices follow the order in which
    ``asyncrl.placement.reserve`` lays out the rollout workers (pool by pool, as configured)."""
    from asyncrl.placement import pools

    links, first = [], 0
    for pool in pools(cfg):
        if pool.role != "rollout":
            continue
        engines = list(range(first, first + pool.count))
        first += pool.count
        links.append(
            PoolLink(
                name=pool.name,
                engines=engines,
                dtype=pool.dtype or cfg.model.dtype,
                transport=pool.sync_transport or cfg.sync.transport,
                bucket_mb=pool.sync_bucket_mb or cfg.sync.bucket_mb,
                tensor_parallel=pool.tensor_parallel,
                live=list(engines),
            )
        )
    return links


class BucketedSync:
    """``sync.transport=broadcast|store``: a planned, bucketed link from the trainer to each rollout pool.

    Each pool has its own plan (its dtype and bucket size), its own transport and its own group generation;
    the trainer sends every pool at once (each pool on a thread of its own), and a dead or hung engine only
    rebuilds its pool's link."""

    def __init__(self, cfg: Config, trainer: Any, rollouts: list, store_url: str) -> None:
        self.cfg, self.trainer, self.rollouts, self.store_url = cfg, trainer, rollouts, store_url
        self.links = pool_links(cfg)
        placed = sum(len(link.engines) for link in self.links)
        if placed != len(rollouts):
            raise SyncError(f"the rollout pools hold {placed} engines, but {len(rollouts)} rollout workers run")
        for link in self.links:
            self._connect(link)

    def _connect(self, link: PoolLink) -> None:
        """(Re)build ``link`` over its live engines: a new generation of the pool's group."""
        import ray

        sc, timeout = self.cfg.sync, self.cfg.sync.timeout_s + CONNECT_MARGIN_S
        link.generation += 1
        if link.generation:
            log.info("pool %s: rebuilding its group (generation %d) over engines %s", link.name, link.generation,
                     [f"rollout-{i}" for i in link.live])  # fmt: skip
        # Only the broadcast transport rendezvouses there; hosting it for the store transport costs one idle socket.
        port = ray.get(self.trainer.sync_host.remote(sc.timeout_s), timeout=timeout)
        spec = LinkSpec(
            pool=link.name,
            transport=link.transport,
            world_size=1 + len(link.live),
            timeout_s=sc.timeout_s,
            generation=link.generation,
            port=port,
            store_url=self.store_url,
            run_id=self.cfg.run.name,
        )
        plan = self.trainer.sync_plan.remote(link.name, link.dtype, link.bucket_mb, link.tensor_parallel)
        plan = ray.get(plan, timeout=timeout)
        link.plan_buckets = len(plan["buckets"])
        refs = [self.trainer.sync_connect.remote(spec, plan)]
        refs += [self.rollouts[i].sync_connect.remote(plan, spec, rank) for rank, i in enumerate(link.live, 1)]
        ray.get(refs, timeout=timeout)

    def sync(self, version: int) -> float:
        import ray

        tic = time.monotonic()
        for link in self.links:
            if link.returning:  # a restarted engine has no link yet and its old rank is gone: a new generation
                link.live, link.returning = sorted({*link.live, *link.returning}), set()
                self._connect(link)
        timeout = self.cfg.sync.timeout_s + CONNECT_MARGIN_S
        send = self.trainer.sync_send.remote(version)
        receives = {
            i: self.rollouts[i].sync_receive.remote(version, self.cfg.sync.mode)
            for link in self.links
            for i in link.live
        }
        refs = [send, *receives.values()]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        send_errors: dict[str, str] = {}
        send_late = f"the trainer did not finish sending within {timeout:.0f}s" if send in waiting else ""
        if not send_late:
            try:
                ray.get(send)
            except ray.exceptions.RayTaskError as err:
                # Several pools: the sender says which failed; one pool: its error is that pool's.
                failures = getattr(err.cause, "failures", None)
                send_errors = failures or {link.name: str(err.cause) for link in self.links}
        hung, failed = [], []
        for link in self.links:
            dead, link_hung, errors = [], [], []
            buckets = f"version {version}, buckets 0-{link.plan_buckets - 1}"
            for index in link.live:
                ref = receives[index]
                if ref in waiting:
                    link_hung.append(index)
                    errors.append(
                        f"engine rollout-{index} did not stage every bucket of {buckets} within {timeout:.0f}s"
                    )
                    continue
                try:
                    ray.get(ref)
                except ray.exceptions.ActorDiedError:
                    dead.append(index)
                except ray.exceptions.RayTaskError as err:
                    errors.append(str(err.cause))
            if send_late:
                errors.append(send_late)
            # A send that failed because a receiver died is expected: the link is rebuilt below.
            if link.name in send_errors and (not dead or link_hung):
                errors.append(send_errors[link.name])  # names the bucket the trainer was on
            if dead or link_hung:
                log.warning("pool %s: engine(s) %s died or hung during the sync to version %d; rebuilding the "
                            "pool's group without them", link.name, [*dead, *link_hung], version)  # fmt: skip
                link.live = [i for i in link.live if i not in dead and i not in link_hung]
                if link.live:
                    self._connect(link)
                else:  # the pool's group is empty until an engine returns (rejoin); the other pools go on
                    ray.get(self.trainer.sync_disconnect.remote(link.name), timeout=timeout)
            hung.extend(link_hung)
            if errors:
                what = "timed out" if link_hung else "failed"
                failed.append(f"pool {link.name}: sync to version {version} {what}: " + "; ".join(errors))
        if hung:
            raise EnginesHung("; ".join(failed), hung)
        if failed:
            raise SyncError("; ".join(failed))
        return time.monotonic() - tic

    def rejoin(self, index: int) -> None:
        """Add engine ``index`` (restarted) back to its pool: it gets the trainer's current weights through the
        object store now (``snapshot``, even while a step runs), and the pool's group is rebuilt with it at the next
        sync, before the weights are sent. Waits on the snapshot and the engine's load, each ``sync.timeout_s``."""
        import ray

        weights, version = ray.get(self.trainer.snapshot.remote(), timeout=self.cfg.sync.timeout_s)
        ray.get(self.rollouts[index].update_weights.remote(weights, version), timeout=self.cfg.sync.timeout_s)
        link = next(link for link in self.links if index in link.engines)
        link.returning.add(index)

    def close(self) -> None:
        pass


STRATEGIES: dict[str, type] = {"object_store": ObjectStoreSync, **dict.fromkeys(TRANSPORTS, BucketedSync)}
"""Controller-side strategy per ``sync.transport``."""


def build_weight_sync(cfg: Config, trainer: Any, rollouts: list, store_url: str) -> ObjectStoreSync | BucketedSync:
    """The weight sync for ``cfg.sync.transport`` between these actors (connects bucketed links now)."""
    return STRATEGIES[cfg.sync.transport](cfg, trainer, rollouts, store_url)
