"""The ``WeightTransport`` interface: move one bucket of one pool from the trainer to its engines.

Both ends build their transport from the same ``LinkSpec`` (plain data the controller hands to the
trainer and to every engine of the pool) and their own rank: rank 0 is the trainer and only sends,
ranks 1..N are the pool's engines and only receive. ``sync.transport`` picks the class through
``asyncrl.sync.registry.TRANSPORTS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from asyncrl.sync.registry import TRANSPORTS

if TYPE_CHECKING:
    import torch

SENDER_RANK = 0


class SyncError(RuntimeError):
    """A sync step that failed or timed out; the message names the pool, the engine and the bucket."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """How one pool's transport is reached; identical on every end of the link."""

    pool: str
    transport: str
    """A key of ``TRANSPORTS``."""
    world_size: int
    """1 sender + the number of engines in the pool."""
    timeout_s: float
    """Bound on every collective and wait (``sync.timeout_s``)."""
    generation: int = 0
    """Bumped each time the group is rebuilt (an engine dropped or returned); scopes rendezvous keys."""
    host: str = "127.0.0.1"
    """broadcast: where the sender's TCPStore listens."""
    port: int = 0
    """broadcast: the TCPStore port."""
    device: str = "cpu"
    """broadcast: `cpu` (gloo) or `cuda` (NCCL)."""
    sm_count: int = 0
    """broadcast on CUDA: SMs of the pool's device (sets the CTA cap with ``sm_fraction``)."""
    sm_fraction: float = 1.0
    """broadcast on CUDA: ``sync.sm_fraction``."""
    store_url: str = ""
    """store: URL of the transfer store."""
    run_id: str = ""
    """store: the run whose key space holds the buckets."""

    @property
    def engines(self) -> int:
        return self.world_size - 1


class WeightTransport(Protocol):
    """One end of a pool's link. ``send`` runs on the trainer (rank 0), ``receive`` on an engine.

    ``send`` returns once every engine can read the bucket (broadcast: they received it; store:
    it is in the store), so the sender may reuse ``flat`` afterwards. ``receive`` fills ``out``
    (the engine's staging buffer of exactly the bucket's size) and returns it. Both raise
    ``SyncError`` naming pool, engine and bucket after ``LinkSpec.timeout_s``.

    A transport that writes into the engine's memory from the trainer's side (``shm``) also has
    ``staging(numel, dtype) -> Tensor``: the receiver then allocates its buffers there.
    """

    def send(self, version: int, bucket_index: int, flat: torch.Tensor) -> None: ...

    def receive(self, version: int, bucket_index: int, out: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


def build_transport(spec: LinkSpec, rank: int) -> WeightTransport:
    """This end (``rank``) of ``spec``'s link; the class comes from the ``TRANSPORTS`` registry."""
    if spec.transport not in TRANSPORTS:
        raise ValueError(f"pool {spec.pool}: unknown transport {spec.transport!r}; one of {', '.join(TRANSPORTS)}")
    module_name, _, class_name = TRANSPORTS[spec.transport].partition(":")
    transport_class = getattr(importlib.import_module(module_name), class_name)
    return transport_class(spec, rank)


def engine_name(spec: LinkSpec, rank: int) -> str:
    """How errors name a rank of the link."""
    return "trainer" if rank == SENDER_RANK else f"engine {rank - 1}"
