"""The sync plan: which bytes of which tensor go in which bucket, computed once per pool and reused.

A plan fixes the tensor order (the trainer's ``state_dict`` order), the dtype a pool receives, the
engine's tensor-parallel shard of each weight, and cuts the stream into contiguous buckets of about
``bucket_mb``. Sender and receiver build the same plan from the same metadata (``to_dict`` /
``from_dict``), exchanged once when a pool connects, so a sync step moves only bucket payloads: no
names, shapes or pickles per step.

A tensor never straddles two buckets (a tensor larger than ``bucket_mb`` gets a bucket of its own),
so the receiver can hand out views of a received bucket without reassembling anything.

A pool whose engines run tensor-parallel (``resources.pools[i].tensor_parallel`` = N) gets one plan
with N rank layouts: rank r's buckets (``buckets_of(r)``) hold only rank r's shard of each weight
(``asyncrl.sync.tp_layout``), a bucket never mixes ranks, and bucket indices run on across ranks, so
one link carries all of them and each engine hands rank r's shards to its TP worker r. Each rank
receives about 1/N of the sharded weights plus the replicated ones (norms) whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncrl.sync.tp_layout import WHOLE, AttentionHeads, Shard, TPLayoutError, shard_of

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each dtype a pool may receive."""


class PlanError(ValueError):
    """A plan that cannot be built or does not match the tensors it is applied to; names the tensor."""


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor (or its TP shard) lives inside its bucket."""

    name: str
    shape: tuple[int, ...]
    offset: int
    """Elements from the start of the bucket."""
    split_dim: int | None = None
    """The dimension of the full tensor this slot holds a TP shard of; None: the whole tensor."""
    start: int = 0
    """Where the shard starts along ``split_dim``."""

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True, slots=True)
class Bucket:
    index: int
    slots: tuple[TensorSlot, ...]
    numel: int
    """Elements in the flattened bucket (the sum of its slots)."""
    tp_rank: int = 0
    """The engine TP rank whose shards this bucket holds."""


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """One pool's plan: dtype, TP layout and the ordered buckets (rank 0's first, then rank 1's, ...)."""

    pool: str
    dtype: str
    tp_size: int
    buckets: tuple[Bucket, ...]

    @classmethod
    def build(
        cls,
        shapes: Iterable[tuple[str, tuple[int, ...]]],
        *,
        pool: str,
        dtype: str,
        bucket_mb: float,
        tensor_parallel: int = 1,
        heads: AttentionHeads | None = None,
    ) -> SyncPlan:
        """Cut the tensors named in ``shapes`` (in that order) into buckets of at most ``bucket_mb`` MiB of
        ``dtype``; a larger tensor gets a bucket of its own. With ``tensor_parallel`` N > 1, each TP rank gets
        its own buckets of its shards; ``heads`` (the model's attention heads) is then required."""
        if dtype not in DTYPE_BYTES:
            raise PlanError(f"pool {pool}: dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        if tensor_parallel < 1:
            raise PlanError(f"pool {pool}: tensor_parallel must be >= 1, got {tensor_parallel}")
        if tensor_parallel > 1 and heads is None:
            raise PlanError(f"pool {pool}: a tensor_parallel={tensor_parallel} plan needs the model's attention heads")
        shapes = [(name, tuple(shape)) for name, shape in shapes]
        limit = max(1, int(bucket_mb * 2**20) // DTYPE_BYTES[dtype])
        buckets: list[Bucket] = []
        for tp_rank in range(tensor_parallel):
            slots: list[TensorSlot] = []
            filled = 0
            for name, shape in shapes:
                shard = WHOLE if tensor_parallel == 1 else _shard(pool, name, shape, heads, tensor_parallel, tp_rank)
                if slots and filled + _numel(shard.shape(shape)) > limit:
                    buckets.append(Bucket(len(buckets), tuple(slots), filled, tp_rank))
                    slots, filled = [], 0
                slots.append(TensorSlot(name, shard.shape(shape), filled, shard.dim, shard.start))
                filled += slots[-1].numel
            if slots:
                buckets.append(Bucket(len(buckets), tuple(slots), filled, tp_rank))
        return cls(pool=pool, dtype=dtype, tp_size=tensor_parallel, buckets=tuple(buckets))

    def buckets_of(self, tp_rank: int) -> tuple[Bucket, ...]:
        """TP rank ``tp_rank``'s buckets, in order."""
        return tuple(bucket for bucket in self.buckets if bucket.tp_rank == tp_rank)

    def split_by_rank(self, named: list[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
        """Received named tensors (every bucket's, in plan order) as one list per TP rank."""
        by_rank: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(self.tp_size)]
        tensors = iter(named)
        for bucket in self.buckets:
            by_rank[bucket.tp_rank].extend(next(tensors) for _ in bucket.slots)
        return by_rank

    def rank_nbytes(self, tp_rank: int) -> int:
        """Bytes TP rank ``tp_rank`` receives per sync."""
        return sum(bucket.numel for bucket in self.buckets_of(tp_rank)) * DTYPE_BYTES[self.dtype]

    @property
    def nbytes(self) -> int:
        return sum(bucket.numel for bucket in self.buckets) * DTYPE_BYTES[self.dtype]

    @property
    def num_tensors(self) -> int:
        return sum(len(bucket.slots) for bucket in self.buckets)

    @property
    def max_bucket_numel(self) -> int:
        return max((bucket.numel for bucket in self.buckets), default=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (msgpack/pickle-safe): what a receiver needs to rebuild this plan."""
        return {
            "pool": self.pool,
            "dtype": self.dtype,
            "tp_size": self.tp_size,
            "bucket_ranks": [bucket.tp_rank for bucket in self.buckets],
            "buckets": [
                [[slot.name, list(slot.shape), slot.offset, slot.split_dim, slot.start] for slot in bucket.slots]
                for bucket in self.buckets
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyncPlan:
        buckets = []
        ranks = data.get("bucket_ranks") or [0] * len(data["buckets"])
        for index, (slots, tp_rank) in enumerate(zip(data["buckets"], ranks, strict=True)):
            parsed = tuple(TensorSlot(name, tuple(shape), *rest) for name, shape, *rest in slots)
            buckets.append(Bucket(index, parsed, sum(slot.numel for slot in parsed), tp_rank))
        return cls(pool=data["pool"], dtype=data["dtype"], tp_size=data["tp_size"], buckets=tuple(buckets))

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def empty_bucket(self, bucket: Bucket, device: str = "cpu") -> torch.Tensor:
        """A buffer for ``bucket``, zero-filled so its pages are mapped now, not during the first sync."""
        import torch

        return torch.zeros(bucket.numel, dtype=self.torch_dtype(), device=device)

    def flatten(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Cast and copy the bucket's TP rank's shard of every tensor of ``bucket`` into ``out[:bucket.numel]``."""
        flat = out[: bucket.numel]
        for slot in bucket.slots:
            source = tensors.get(slot.name)
            if source is None:
                raise PlanError(f"pool {self.pool}: bucket {bucket.index} needs {slot.name}, which the trainer lacks")
            shard = (
                source
                if slot.split_dim is None
                else source.narrow(slot.split_dim, slot.start, slot.shape[slot.split_dim])
            )
            if tuple(shard.shape) != slot.shape:
                raise PlanError(
                    f"pool {self.pool}: {slot.name} has shape {list(shard.shape)}, the plan says {list(slot.shape)}"
                )
            # copy_ casts and gathers a strided TP shard in one pass, straight into the bucket.
            flat[slot.offset : slot.offset + slot.numel].view(slot.shape).copy_(shard)
        return flat

    def unflatten(self, bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Named views into a received bucket (no copy: the engine copies them into its parameters)."""
        return [(slot.name, flat[slot.offset : slot.offset + slot.numel].view(slot.shape)) for slot in bucket.slots]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _shard(pool: str, name: str, shape: tuple[int, ...], heads: Any, tp_size: int, tp_rank: int) -> Shard:
    try:
        return shard_of(name, shape, heads, tp_size, tp_rank)
    except TPLayoutError as err:
        raise PlanError(f"pool {pool}: {err}") from err


def module_tensors(module: Any) -> dict[str, torch.Tensor]:
    """A module's ``state_dict`` by checkpoint name, detached, without copies; an alias of a tensor
    already listed (a tied ``lm_head.weight``) is left out, as ``save_pretrained`` leaves it out."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach()
    return tensors
