"""The store transport: buckets as raw bytes through the transfer store, for a pool with no shared fabric.

The sender SETs each bucket under a run-scoped key ``sync:<pool>:<version>:<bucket>`` with a TTL of
``timeout_s`` (a bucket nobody reads does not outlive the sync). Each engine polls for the key,
copies the bytes into its staging buffer and INCRs the bucket's read counter; the engine whose
increment reaches the pool's engine count deletes the bucket and its counter, so the store holds a
bucket only while some engine still needs it.

Bytes are the bucket's memory as is (any dtype, bfloat16 included, via a uint8 view): no pickling.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from asyncrl.sync.transport import LinkSpec, SyncError, engine_name

if TYPE_CHECKING:
    import torch

POLL_S = 0.002
"""First wait between GETs of a bucket that is not there yet; doubles up to POLL_MAX_S."""
POLL_MAX_S = 0.05


class StoreTransport:
    """``WeightTransport`` through Redis SET/GET of whole buckets (see the module docstring)."""

    def __init__(self, spec: LinkSpec, rank: int) -> None:
        from storage import connect
        from storage.store import run_prefix

        self.spec, self.rank = spec, rank
        self.client = connect(spec.store_url, spec.timeout_s)
        self.prefix = f"{run_prefix(spec.run_id)}sync:{spec.pool}:"

    def _key(self, version: int, bucket_index: int) -> str:
        return f"{self.prefix}{version}:{bucket_index}"

    def _fail(self, what: str, reason: str) -> SyncError:
        return SyncError(f"pool {self.spec.pool}: {engine_name(self.spec, self.rank)} failed on {what}: {reason}")

    def send(self, version: int, bucket_index: int, flat: torch.Tensor) -> None:
        import redis

        payload = memoryview(flat.contiguous().view(-1).view(_uint8()).numpy())
        try:
            self.client.set(self._key(version, bucket_index), payload, px=int(self.spec.timeout_s * 1000))
        except redis.RedisError as err:
            raise self._fail(f"bucket {bucket_index} of version {version}", str(err)) from err

    def receive(self, version: int, bucket_index: int, out: torch.Tensor) -> torch.Tensor:
        import numpy
        import redis

        key, what = self._key(version, bucket_index), f"bucket {bucket_index} of version {version}"
        deadline, pause = time.monotonic() + self.spec.timeout_s, POLL_S
        try:
            while (payload := self.client.get(key)) is None:
                if time.monotonic() > deadline:
                    raise self._fail(what, f"not in the store after {self.spec.timeout_s}s")
                time.sleep(pause)
                pause = min(2 * pause, POLL_MAX_S)
            target = out.view(-1).view(_uint8())
            if len(payload) != target.numel():
                raise self._fail(what, f"{len(payload)} bytes in the store, the plan expects {target.numel()}")
            target.numpy()[:] = numpy.frombuffer(payload, dtype=numpy.uint8)
            if self.client.incr(key + ":reads") >= self.spec.engines:
                self.client.delete(key, key + ":reads")
            else:
                self.client.pexpire(key + ":reads", int(self.spec.timeout_s * 1000))
        except redis.RedisError as err:
            raise self._fail(what, str(err)) from err
        return out

    def close(self) -> None:
        self.client.close()


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8
