"""The broadcast transport: one torch.distributed group per pool, trainer rank 0 plus one rank per engine.

The group is separate from any default process group (the trainer's DeepSpeed world, the vLLM
worker's own): it is built directly on a ``TCPStore`` that the trainer hosts, under a
``PrefixStore`` of the pool and the group's generation, so a rebuilt group (an engine dropped or
back) never reads a stale rendezvous key. gloo on CPU, NCCL on CUDA, chosen from ``GROUP_BUILDERS``.

SM-aware on CUDA: NCCL runs a collective as CTAs (thread blocks) that occupy SMs next to the
engine's decode kernels. ``cta_limits`` derives the group's ``max_ctas``/``min_ctas`` from the pool
device's SM count and ``sync.sm_fraction``:

    max_ctas = clamp(floor(sm_count * sm_fraction), 1, NCCL_MAX_CTAS)
    min_ctas = max(1, max_ctas // 2)

so the broadcast never takes more than ``sm_fraction`` of the SMs, and keeps at least half its cap
so a small bucket does not crawl on one channel. ``gloo_options`` is the CPU twin: same signature,
the SM arguments are accepted and ignored (gloo runs on CPU threads, not SMs).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncrl.sync.transport import SENDER_RANK, LinkSpec, SyncError, engine_name

if TYPE_CHECKING:
    import torch

NCCL_MAX_CTAS = 32
"""NCCL accepts at most 32 CTAs (channels) per collective."""


@dataclass(frozen=True, slots=True)
class CtaLimits:
    min_ctas: int
    max_ctas: int


def cta_limits(sm_count: int, sm_fraction: float) -> CtaLimits:
    """The NCCL CTA bounds for a device of ``sm_count`` SMs of which the sync may use ``sm_fraction``."""
    if sm_count < 1:
        raise ValueError(f"sm_count must be >= 1, got {sm_count}")
    if not 0 < sm_fraction <= 1:
        raise ValueError(f"sync.sm_fraction must be in (0, 1], got {sm_fraction}")
    max_ctas = min(NCCL_MAX_CTAS, max(1, int(sm_count * sm_fraction)))
    return CtaLimits(min_ctas=max(1, max_ctas // 2), max_ctas=max_ctas)


def nccl_options(timeout_s: float, sm_count: int, sm_fraction: float) -> Any:
    """``ProcessGroupNCCL.Options`` with the CTA cap of ``cta_limits`` (CUDA builds of torch only)."""
    import torch.distributed as dist

    limits = cta_limits(sm_count, sm_fraction)
    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = limits.max_ctas
    options.config.min_ctas = limits.min_ctas
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return options


def gloo_options(timeout_s: float, sm_count: int = 0, sm_fraction: float = 1.0) -> Any:
    """The CPU twin of ``nccl_options``: gloo bound to loopback with the sync timeout; no SMs to cap."""
    from torch.distributed import ProcessGroupGloo

    del sm_count, sm_fraction  # accepted so both builders share one call site
    options = ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    # Loopback only: the default device resolves the host name, which may bind an external address.
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return options


def _gloo_group(store: Any, rank: int, spec: LinkSpec) -> Any:
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, spec.world_size, gloo_options(spec.timeout_s))


def _nccl_group(store: Any, rank: int, spec: LinkSpec) -> Any:
    import torch.distributed as dist

    options = nccl_options(spec.timeout_s, spec.sm_count, spec.sm_fraction)
    return dist.ProcessGroupNCCL(store, rank, spec.world_size, options)


GROUP_BUILDERS: dict[str, Callable[[Any, int, LinkSpec], Any]] = {"cpu": _gloo_group, "cuda": _nccl_group}
"""Process-group backend per device kind of the pool."""


class Rendezvous:
    """The TCPStore the trainer hosts on loopback; engines connect to its port. One per trainer."""

    def __init__(self, timeout_s: float, host: str = "127.0.0.1") -> None:
        from torch.distributed import TCPStore

        self.host = host
        self.store = TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self.port = int(self.store.port)


# Rank 0 hosts the store in its process; a group built in that process must reuse it, not connect anew.
_hosted: dict[int, Rendezvous] = {}
_hosted_lock = threading.Lock()


def host_rendezvous(timeout_s: float) -> Rendezvous:
    """This process's rendezvous store (created once), for the sender's groups."""
    with _hosted_lock:
        if not _hosted:
            rendezvous = Rendezvous(timeout_s)
            _hosted[rendezvous.port] = rendezvous
        return next(iter(_hosted.values()))


def link_store(spec: LinkSpec, own_connection: bool = False) -> Any:
    """The rendezvous store under this link's prefix (pool and generation): the hosted one in the sender's
    process, a client of it elsewhere. ``own_connection``: always a new client (a blocking ``wait`` holds its
    connection, so a thread that waits while another sets needs one of its own)."""
    from torch.distributed import PrefixStore, TCPStore

    if spec.port in _hosted and not own_connection:
        base = _hosted[spec.port].store
    else:
        base = TCPStore(spec.host, spec.port, is_master=False, timeout=datetime.timedelta(seconds=spec.timeout_s))
    return PrefixStore(f"asyncrl-sync/{spec.run_id}/{spec.pool}/{spec.generation}", base)


class BroadcastTransport:
    """``WeightTransport`` over a torch.distributed broadcast from rank 0 (gloo on CPU, NCCL on CUDA).

    Building it is collective: every rank of ``spec`` must construct its end within ``timeout_s``.
    """

    def __init__(self, spec: LinkSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank
        store = link_store(spec)
        try:
            self.group = GROUP_BUILDERS[spec.device](store, rank, spec)
        except RuntimeError as err:
            raise SyncError(
                f"pool {spec.pool}: {engine_name(spec, rank)} could not join the sync group "
                f"(generation {spec.generation}, {spec.world_size} ranks) within {spec.timeout_s}s: {err}"
            ) from err

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        try:
            self.group.broadcast([tensor], _root_options(timeout)).wait(timeout)
        except RuntimeError as err:
            # gloo names the peer by address only; the rank that failed is what the caller can act on.
            raise SyncError(
                f"pool {self.spec.pool}: {engine_name(self.spec, self.rank)} failed on {what} "
                f"(timeout {self.spec.timeout_s}s): {err}"
            ) from err

    def send(self, version: int, bucket_index: int, flat: torch.Tensor) -> None:
        self._broadcast(flat, f"bucket {bucket_index} of version {version}")

    def receive(self, version: int, bucket_index: int, out: torch.Tensor) -> torch.Tensor:
        self._broadcast(out, f"bucket {bucket_index} of version {version}")
        return out

    def close(self) -> None:
        # Dropping the group closes its pairs; an explicit abort would also kill peers' pending work.
        self.group = None


def _root_options(timeout: datetime.timedelta) -> Any:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = SENDER_RANK
    options.rootTensor = 0
    options.timeout = timeout
    return options
