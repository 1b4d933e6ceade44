"""Trainer side of a sync: per pool, flatten/cast bucket i+1 while bucket i is on the wire.

A ``PoolSender`` owns one pool's plan, transport and two bucket buffers (allocated once at the
plan's largest bucket). A packer thread fills a free buffer with the next bucket and hands it over;
the sending thread sends it and returns the buffer. With two buffers the cast of one bucket
overlaps the send of the previous, and memory stays at two buckets whatever the model size.
``send_to_pools`` runs several pools at once (each its own thread), so a slow pool (a store link)
does not hold back a fast one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncrl.sync.plan import SyncPlan
from asyncrl.sync.transport import SyncError, WeightTransport

if TYPE_CHECKING:
    import torch

PIPELINE_DEPTH = 2
"""Bucket buffers per pool: one being packed while the other is sent."""


@dataclass(frozen=True, slots=True)
class SendStats:
    pool: str
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class PoolSender:
    """Sends one pool's buckets through its transport, packing ahead of the wire."""

    def __init__(self, plan: SyncPlan, transport: WeightTransport, timeout_s: float, device: str = "cpu") -> None:
        import torch

        self.plan, self.transport, self.timeout_s = plan, transport, timeout_s
        self._buffers = [
            torch.zeros(plan.max_bucket_numel, dtype=plan.torch_dtype(), device=device) for _ in range(PIPELINE_DEPTH)
        ]

    def send(self, tensors: Mapping[str, torch.Tensor], version: int) -> SendStats:
        """Every bucket of the plan, cast from ``tensors``; returns once the transport took the last."""
        started = time.perf_counter()
        free: queue.Queue = queue.Queue()
        for buffer in self._buffers:
            free.put(buffer)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        # A transport that can say where a bucket should land (shm: the engine's buffer) is packed into directly.
        target = getattr(self.transport, "pack_target", None)

        def pack() -> None:
            """Consumes free buffers; waits (bounded) for the sender to return one, or for the transport's target."""
            try:
                for bucket in self.plan.buckets:
                    if target is not None:
                        out = target(version, bucket.index, bucket.numel, self.plan.torch_dtype())
                        if stop.is_set():
                            return
                        ready.put((bucket, self.plan.flatten(bucket, tensors, out), None))
                        continue
                    buffer = free.get(timeout=self.timeout_s)
                    if stop.is_set():
                        return
                    ready.put((bucket, self.plan.flatten(bucket, tensors, buffer), buffer))
            except BaseException as err:  # handed to the sending thread, which raises it
                ready.put(err)

        packer = threading.Thread(target=pack, name=f"sync-pack-{self.plan.pool}", daemon=True)
        packer.start()
        try:
            for expected in self.plan.buckets:
                try:  # a packer waiting on the transport fails by itself within timeout_s, naming the engine
                    item = ready.get(timeout=self.timeout_s * (1 if target is None else 2))
                except queue.Empty:
                    raise SyncError(
                        f"pool {self.plan.pool}: trainer could not pack bucket {expected.index} "
                        f"within {self.timeout_s}s"
                    ) from None
                if isinstance(item, BaseException):
                    raise item
                bucket, flat, buffer = item
                self.transport.send(version, bucket.index, flat)
                if buffer is not None:
                    free.put(buffer)
        finally:
            stop.set()
            free.put(self._buffers[0])  # wakes a packer waiting for a buffer after a failed send
            packer.join(timeout=self.timeout_s)
        return SendStats(self.plan.pool, self.plan.nbytes, time.perf_counter() - started)

    def close(self) -> None:
        self.transport.close()


class PoolsFailed(SyncError):
    """Sends to some of several pools failed; ``failures`` maps each failed pool to its error message (the
    other pools got every bucket)."""

    def __init__(self, message: str, failures: dict[str, str]) -> None:
        super().__init__(message, failures)  # both in args: the error crosses Ray by pickle
        self.failures = failures

    def __str__(self) -> str:
        return self.args[0]


def send_to_pools(senders: Mapping[str, PoolSender], tensors: Mapping[str, torch.Tensor], version: int) -> dict:
    """Send ``version`` to every pool at once; ``{pool: SendStats}``. With one pool its error raises as is;
    with several, a failure raises ``PoolsFailed`` after the other pools finished (they do not depend on it)."""
    if not senders:  # every pool's engines are gone until they come back (asyncrl/weight_sync.py)
        return {}
    if len(senders) == 1:
        ((pool, sender),) = senders.items()
        return {pool: sender.send(tensors, version)}
    with ThreadPoolExecutor(max_workers=len(senders), thread_name_prefix="sync-pool") as pool_threads:
        futures = {pool: pool_threads.submit(sender.send, tensors, version) for pool, sender in senders.items()}
        failures = {pool: str(future.exception()) for pool, future in futures.items() if future.exception() is not None}
        if failures:
            raise PoolsFailed("; ".join(failures.values()), failures)
        return {pool: future.result() for pool, future in futures.items()}
