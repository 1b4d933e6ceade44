"""Worker pools as Ray placement groups: one group per pool, one bundle per worker.

A pool (``resources.pools[i]``) asks for CPUs, GPUs, an accelerator type and custom resource
labels per worker. Before a group is created its bundles are checked against the cluster's
nodes, so a pool that can never fit fails at once naming the missing resource instead of
waiting forever; a group that could fit but does not become ready (other jobs hold the
resources) fails after ``resources.placement_timeout_s`` naming what is free.

With no pools configured the single-machine default applies: one trainer of
``trainer.threads`` CPUs and ``rollout.num_workers`` rollout workers of ``rollout.threads`` CPUs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from asyncrl.config import Config, PoolConfig
from asyncrl.runtime import WORKER_ENV

log = logging.getLogger(__name__)

# Ray's label resource for an accelerator type; an actor asks for a sliver of it to land on such a node.
ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SLIVER = 0.001


class PlacementError(RuntimeError):
    """A pool the cluster cannot hold; the message names the pool and the missing resource."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one worker runs: its pool, its bundle of the pool's placement group, and its thread budget."""

    pool: PoolConfig
    bundle_index: int
    placement_group: Any

    @property
    def threads(self) -> int:
        return max(1, int(self.pool.cpus))

    def actor_options(self) -> dict[str, Any]:
        """``ray.remote(...).options(**this)``: the bundle's resources, pinned to the bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        threads = str(self.threads)
        return {
            "num_cpus": self.pool.cpus,
            "num_gpus": self.pool.gpus,
            "resources": _labels(self.pool),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=self.bundle_index
            ),
            # WORKER_ENV again: under `ray job submit` the job's runtime_env, not the driver's ray.init, is the base.
            "runtime_env": {"env_vars": {**WORKER_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
        }

    def worker_config(self, cfg: Config) -> Config:
        """The job's config as this pool's workers see it: the pool's engine dtype replaces model.dtype."""
        if not self.pool.dtype or self.pool.dtype == cfg.model.dtype:
            return cfg
        model = dataclasses.replace(cfg.model)
        # Assigned, not passed to replace: an engine dtype (float16) may be one model.dtype (the trainer's) does not
        # allow; resources.pools[i].dtype was validated against the engine dtypes.
        model.dtype = self.pool.dtype
        return dataclasses.replace(cfg, model=model)


def pools(cfg: Config) -> list[PoolConfig]:
    """``resources.pools``, or the single-machine default built from ``trainer.threads`` and ``rollout``."""
    if cfg.resources.pools:
        return list(cfg.resources.pools)
    return [
        PoolConfig(name="trainer", role="trainer", count=1, cpus=float(cfg.trainer.threads)),
        PoolConfig(name="rollout", role="rollout", count=cfg.rollout.num_workers, cpus=float(cfg.rollout.threads)),
    ]


def bundle(pool: PoolConfig) -> dict[str, float]:
    """The resources of one worker of ``pool`` as a placement-group bundle (zero amounts left out)."""
    needs = {"CPU": pool.cpus, "GPU": pool.gpus, **_labels(pool)}
    return {name: amount for name, amount in needs.items() if amount > 0}


def _labels(pool: PoolConfig) -> dict[str, float]:
    labels = dict(pool.resources)
    if pool.accelerator_type:
        labels[ACCELERATOR_PREFIX + pool.accelerator_type] = ACCELERATOR_SLIVER
    return labels


def check_fits(pool_list: list[PoolConfig], nodes: list[dict[str, float]]) -> None:
    """Raise ``PlacementError`` if some pool can never be placed on ``nodes`` (each node's total resources).

    Checks, per pool: every resource a worker needs exists on some node; some node holds a whole
    worker; STRICT_SPREAD has enough such nodes and STRICT_PACK one node for the whole pool; and,
    over all pools, the cluster's totals cover the sum of the bundles.
    """
    offered = sorted({name for node in nodes for name in node})
    for pool in pool_list:
        need = bundle(pool)
        if not need:
            raise PlacementError(f"pool {pool.name!r} asks for no resources: give it cpus, gpus or a resource label")
        for name, amount in need.items():
            largest = max((node.get(name, 0.0) for node in nodes), default=0.0)
            if largest == 0:
                hint = (
                    "" if name in ("CPU", "GPU") else f"; start a node with `ray start --resources '{{\"{name}\": 1}}'`"
                )
                raise PlacementError(
                    f"pool {pool.name!r} needs resource {name!r}, which no node of the cluster has "
                    f"(nodes offer: {', '.join(offered) or 'nothing'}){hint}"
                )
            if largest < amount:
                raise PlacementError(
                    f"pool {pool.name!r} needs {amount:g} {name} per worker, but the largest node has {largest:g}"
                )
        fitting = [node for node in nodes if all(node.get(name, 0.0) >= amount for name, amount in need.items())]
        if not fitting:
            raise PlacementError(f"pool {pool.name!r}: no single node holds one worker's bundle {need}")
        if pool.strategy == "STRICT_SPREAD" and len(fitting) < pool.count:
            raise PlacementError(
                f"pool {pool.name!r}: STRICT_SPREAD puts {pool.count} workers on {pool.count} different nodes, "
                f"but only {len(fitting)} node(s) hold a worker's bundle {need}"
            )
        if pool.strategy == "STRICT_PACK" and not any(
            all(node.get(name, 0.0) >= amount * pool.count for name, amount in need.items()) for node in nodes
        ):
            raise PlacementError(
                f"pool {pool.name!r}: STRICT_PACK puts all {pool.count} workers on one node, and no node holds "
                f"{pool.count} x {need}"
            )
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + amount
    wanted: dict[str, float] = {}
    for pool in pool_list:
        for name, amount in bundle(pool).items():
            wanted[name] = wanted.get(name, 0.0) + amount * pool.count
    short = {name: (amount, totals.get(name, 0.0)) for name, amount in wanted.items() if amount > totals.get(name, 0.0)}
    if short:
        detail = ", ".join(f"{name}: {need:g} needed, {have:g} in the cluster" for name, (need, have) in short.items())
        raise PlacementError(f"the pools together need more than the cluster has ({detail})")


def node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def reserve(cfg: Config) -> dict[str, list[Slot]]:
    """Create and wait for one placement group per pool; ``{"trainer": [...], "rollout": [...]}`` slots.

    Waits on: each group becoming ready, at most ``resources.placement_timeout_s``; a group that
    is not ready by then is removed and the run fails naming the pool and what the cluster has free.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pool_list = pools(cfg)
    check_fits(pool_list, node_resources())
    slots: dict[str, list[Slot]] = {"trainer": [], "rollout": []}
    for pool in pool_list:
        group = placement_group([bundle(pool)] * pool.count, strategy=pool.strategy, name=f"{cfg.run.name}-{pool.name}")
        ready, _ = ray.wait([group.ready()], timeout=cfg.resources.placement_timeout_s)
        if not ready:
            remove_placement_group(group)
            raise PlacementError(
                f"pool {pool.name!r} ({pool.count} x {bundle(pool)}, {pool.strategy}) was not placed within "
                f"resources.placement_timeout_s={cfg.resources.placement_timeout_s:g}s; free now: "
                f"{ray.available_resources()}"
            )
        log.info("pool %s placed: %d x %s (%s)", pool.name, pool.count, bundle(pool), pool.strategy)
        slots[pool.role].extend(Slot(pool=pool, bundle_index=i, placement_group=group) for i in range(pool.count))
    return slots


def cpus_needed(cfg: Config) -> float:
    """CPUs the pools reserve in all: a local Ray must offer at least this many."""
    return sum(pool.cpus * pool.count for pool in pools(cfg))
