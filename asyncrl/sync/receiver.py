"""Engine side of a sync: receive every bucket into staging buffers, then switch in one step.

Staging buffers are allocated once from the plan; a sync writes them while the engine keeps decoding
with the live weights (``inflight``), then hands the engine the whole new weight set at once, which
it loads between two steps under its lock: no step ever sees half of one version and half of the
next. In ``pause`` mode the engine stops stepping from the first bucket to the switch instead.
A sync that fails or times out leaves the live weights untouched.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncrl.sync.plan import SyncPlan
from asyncrl.sync.transport import LinkSpec, WeightTransport, build_transport

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class ReceiveStats:
    receive_seconds: float
    """First bucket awaited to last bucket staged (the engine decoded meanwhile in inflight mode)."""
    switch_seconds: float
    """Last bucket staged to the new weights live (with staged updates the engine steps meanwhile)."""
    bytes: int
    locked_seconds: float = 0.0
    """The part of ``switch_seconds`` under the engine's lock (no step runs): the swap, or vLLM's reload."""


class WeightReceiver:
    """One engine's end of a pool link, with the pool's plan and staging buffers."""

    def __init__(self, plan: SyncPlan, transport: WeightTransport, device: str = "cpu") -> None:
        self.plan, self.transport = plan, transport
        # A transport that writes into the engine's memory itself (shm) allocates the buffers it can reach.
        allocate = getattr(transport, "staging", None)
        self.staging = [
            allocate(bucket.numel, plan.torch_dtype()) if allocate else plan.empty_bucket(bucket, device)
            for bucket in plan.buckets
        ]

    @classmethod
    def connect(cls, plan_dict: dict, spec: LinkSpec, rank: int) -> WeightReceiver:
        """Join the pool's link as ``rank`` with the plan the sender published (collective for broadcast)."""
        return cls(SyncPlan.from_dict(plan_dict), build_transport(spec, rank), spec.device)

    def receive(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """Every bucket of ``version``, staged; the named views stay valid until the next ``receive``."""
        named = []
        for bucket, buffer in zip(self.plan.buckets, self.staging, strict=True):
            self.transport.receive(version, bucket.index, buffer)
            named.extend(self.plan.unflatten(bucket, buffer))
        return named

    def staged(self) -> list[tuple[str, torch.Tensor]]:
        """Named views of the staging buffers (what the last ``receive`` staged)."""
        return [
            named
            for bucket, flat in zip(self.plan.buckets, self.staging, strict=True)
            for named in self.plan.unflatten(bucket, flat)
        ]

    def apply_to(self, engine: Any, **options: Any) -> Callable[[list[tuple[str, torch.Tensor]], int], object]:
        """``engine``'s update for what this plan delivers: whole tensors (``update_weights``, with ``options``),
        or, for a tensor-parallel plan, each TP rank's shards (``update_weight_shards``)."""
        if self.plan.tp_size == 1:
            return functools.partial(engine.update_weights, **options)

        def apply_shards(named: list[tuple[str, torch.Tensor]], version: int) -> float:
            return engine.update_weight_shards(self.plan.split_by_rank(named), version)

        return apply_shards

    def sync(
        self,
        version: int,
        apply: Callable[[list[tuple[str, torch.Tensor]], int], object],
        pause: Callable[[], object] | None = None,
    ) -> ReceiveStats:
        """Receive ``version`` and switch to it with ``apply(named_tensors, version)``.

        ``pause`` (mode ``pause``): a context manager factory that stops the engine stepping for the
        whole receive; without it (``inflight``) the engine decodes until ``apply``.
        """
        started = time.perf_counter()
        if pause is None:
            named = self.receive(version)
            received = time.perf_counter()
            locked = apply(named, version)
        else:
            with pause():
                named = self.receive(version)
                received = time.perf_counter()
                locked = apply(named, version)
        done = time.perf_counter()
        locked = locked if isinstance(locked, float) else done - received
        return ReceiveStats(received - started, done - received, self.plan.nbytes, locked)

    def close(self) -> None:
        self.transport.close()
