"""The shared-memory transport: the trainer writes each bucket straight into every engine's staging buffer.

For a pool on the trainer's machine, the CPU twin of what colocated GPU systems do with CUDA IPC
handles. Each engine allocates its staging buffers (one per bucket of the plan) as files in
``/dev/shm`` mapped into its memory (``staging``); the trainer maps them on first use, and from then
on the trainer packs a bucket straight into the engine's buffer: no socket, no kernel copy, no copy on the
engine's side, whose cores stay with decoding. A file is unlinked as
soon as the trainer mapped it (the mappings keep the memory), so a crash leaves nothing behind.

Control goes through the link's rendezvous store (``broadcast.link_store``: the TCPStore the
trainer hosts, under the pool's and generation's prefix), two small keys per engine and bucket:

- the engine, in ``receive``: ``want/<version>/<bucket>/<rank>`` = "<path> <bytes>" (its buffer is
  free: the previous sync's switch is done with it), then waits for ``ready/<version>/<bucket>/<rank>``;
- the trainer, in ``pack_target`` (``PoolSender`` asks before packing a bucket) or else in ``send``:
  waits for every engine's ``want``, checks the size against its own, and packs the bucket straight
  into the first engine's buffer (the only copy of the bytes on the path); ``send`` copies it into
  the other engines' buffers and sets ``ready``.

Every wait is bounded by ``timeout_s``; the error names the pool, the engine(s) and the bucket.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import TYPE_CHECKING, Any

from asyncrl.sync.broadcast import link_store
from asyncrl.sync.transport import SENDER_RANK, LinkSpec, SyncError, engine_name

if TYPE_CHECKING:
    import torch


def shm_dir() -> str:
    """Where the buffers' files live: the machine's shared-memory tmpfs when it has one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class ShmTransport:
    """``WeightTransport`` through shared-memory staging buffers (see the module docstring)."""

    def __init__(self, spec: LinkSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank
        self.store = link_store(spec)
        # The trainer waits for engines in the packing thread while the sending thread sets keys.
        self.wait_store = link_store(spec, own_connection=True) if rank == SENDER_RANK else self.store
        self.timeout = datetime.timedelta(seconds=spec.timeout_s)
        self._claimed: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        """Trainer: (version, bucket) -> the engines' buffers, claimed by ``pack_target`` for ``send``."""
        self._own: dict[int, tuple[str, torch.Tensor]] = {}
        """Engine: data_ptr of a staging buffer -> (its file, the mapping)."""
        self._mapped: dict[str, torch.Tensor] = {}
        """Trainer: an engine's file -> the trainer's mapping of it."""

    def staging(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Engine: a buffer of ``numel`` elements in shared memory, for ``receive(..., out=)``; zero-filled so
        its pages exist before the first sync."""
        import torch

        if self.rank == SENDER_RANK:
            raise ValueError(f"pool {self.spec.pool}: the trainer does not receive")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        name = f"asyncrl-sync-{self.spec.run_id or 'run'}-{self.spec.pool}-g{self.spec.generation}-r{self.rank}"
        path = os.path.join(shm_dir(), f"{name}-{os.getpid()}-{len(self._own)}")
        raw = torch.from_file(path, shared=True, size=max(1, numel * itemsize), dtype=torch.uint8)
        raw.zero_()
        buffer = raw[: numel * itemsize].view(dtype)
        self._own[buffer.data_ptr()] = (path, buffer)
        return buffer

    def _fail(self, what: str, reason: str, rank: int | None = None) -> SyncError:
        who = engine_name(self.spec, self.rank if rank is None else rank)
        return SyncError(f"pool {self.spec.pool}: {who} failed on {what}: {reason}")

    def _claim(self, version: int, bucket_index: int, nbytes: int) -> dict[int, torch.Tensor]:
        """Wait until every engine asked for this bucket; each engine's mapped buffer (checked against the plan)."""
        what = f"bucket {bucket_index} of version {version}"
        wants = {rank: f"want/{version}/{bucket_index}/{rank}" for rank in range(1, self.spec.world_size)}
        try:
            self.wait_store.wait(list(wants.values()), self.timeout)
        except RuntimeError:
            missing = [rank for rank, key in wants.items() if not self.wait_store.check([key])]
            names = ", ".join(engine_name(self.spec, rank) for rank in missing)
            raise self._fail(what, f"{names} did not ask for it within {self.spec.timeout_s}s") from None
        buffers = {}
        for rank, key in wants.items():
            path, their_bytes = self.wait_store.get(key).decode().split(" ")
            if int(their_bytes) != nbytes:
                raise self._fail(
                    what,
                    f"{engine_name(self.spec, rank)} has a {their_bytes}-byte buffer for it, the trainer "
                    f"{nbytes} bytes: the two ends' plans differ",
                )
            if path not in self._mapped:
                self._mapped[path] = _map(path, nbytes, what, self, rank)
            buffers[rank] = self._mapped[path]
            self.wait_store.delete_key(key)
        return buffers

    def pack_target(self, version: int, bucket_index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Trainer: where to pack this bucket so that ``send`` moves nothing: the first engine's buffer, once
        every engine asked for the bucket (``PoolSender`` packs into it)."""
        import torch

        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        buffers = self._claim(version, bucket_index, nbytes)
        self._claimed[(version, bucket_index)] = buffers
        return buffers[1][:nbytes].view(dtype)

    def send(self, version: int, bucket_index: int, flat: torch.Tensor) -> None:
        import torch

        source = flat.contiguous().view(-1).view(torch.uint8)
        buffers = self._claimed.pop((version, bucket_index), None)
        if buffers is None:
            buffers = self._claim(version, bucket_index, source.numel())
        for rank, target in buffers.items():
            if target.data_ptr() != source.data_ptr():  # not the buffer the bucket was packed into
                target.copy_(source)
            self.store.set(f"ready/{version}/{bucket_index}/{rank}", "1")

    def receive(self, version: int, bucket_index: int, out: torch.Tensor) -> torch.Tensor:
        what = f"bucket {bucket_index} of version {version}"
        owned = self._own.get(out.data_ptr())
        if owned is None or owned[1].numel() != out.numel():
            raise ValueError(f"pool {self.spec.pool}: receive needs a buffer from ShmTransport.staging")
        nbytes = out.numel() * out.element_size()
        self.store.set(f"want/{version}/{bucket_index}/{self.rank}", f"{owned[0]} {nbytes}")
        ready = f"ready/{version}/{bucket_index}/{self.rank}"
        try:
            self.store.wait([ready], self.timeout)
        except RuntimeError:
            raise self._fail(what, f"the trainer did not write it within {self.spec.timeout_s}s") from None
        self.store.delete_key(ready)
        return out

    def close(self) -> None:
        for path, _ in self._own.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # the trainer mapped it and unlinked it, as it should
        self._own.clear()
        self._mapped.clear()


def _map(path: str, nbytes: int, what: str, transport: ShmTransport, rank: int) -> Any:
    """The trainer's mapping of an engine's buffer file, which is then unlinked (the mappings hold the memory)."""
    import torch

    if not os.path.exists(path):
        raise transport._fail(what, f"its buffer {path} does not exist (not on this machine?)", rank)
    mapping = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    os.unlink(path)
    return mapping
