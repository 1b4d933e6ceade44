"""The sync plan: which bytes of which tensor go in which bucket, computed once per pool and reused.

A plan fixes the tensor order (the trainer's ``state_dict`` order), the dtype a pool receives, the
engine's tensor-parallel shard of each weight, and cuts the stream into contiguous buckets of about
``bucket_mb``. Sender and receiver build the same plan from the same metadata (``to_dict`` /
``from_dict``), exchanged once when a pool connects, so a sync step moves only bucket payloads: no
names, shapes or pickles per step.

A tensor never straddles two buckets (a tensor larger than ``bucket_mb`` gets a bucket of its own),
so the receiver can hand out views of a received bucket without reassembling anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each dtype a pool may receive."""

# Tensor-parallel layout of Qwen2/Llama checkpoint weights, as vLLM shards them: column-parallel
# layers split their output rows (dim 0), row-parallel layers their input columns (dim 1), the
# vocabulary-parallel embedding and LM head split the vocabulary (dim 0). Anything else (norms,
# rotary buffers) is replicated on every rank.
_TP_SPLIT_DIM: dict[str, int] = {
    "q_proj.weight": 0,
    "q_proj.bias": 0,
    "k_proj.weight": 0,
    "k_proj.bias": 0,
    "v_proj.weight": 0,
    "v_proj.bias": 0,
    "gate_proj.weight": 0,
    "up_proj.weight": 0,
    "o_proj.weight": 1,
    "down_proj.weight": 1,
    "embed_tokens.weight": 0,
    "lm_head.weight": 0,
}


class PlanError(ValueError):
    """A plan that cannot be built or does not match the tensors it is applied to; names the tensor."""


def tp_split_dim(name: str) -> int | None:
    """The dimension along which tensor-parallel ranks split weight ``name``; None if replicated."""
    for suffix, dim in _TP_SPLIT_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def tp_shard_shape(name: str, shape: tuple[int, ...], tp_size: int) -> tuple[int, ...]:
    """Shape of one rank's shard of ``name`` at tensor-parallel size ``tp_size``."""
    dim = tp_split_dim(name)
    if tp_size == 1 or dim is None:
        return shape
    if shape[dim] % tp_size:
        # vLLM would pad the vocabulary or replicate KV heads here; this plan only splits evenly.
        raise PlanError(f"{name}: dim {dim} of shape {list(shape)} does not split evenly across {tp_size} TP ranks")
    return (*shape[:dim], shape[dim] // tp_size, *shape[dim + 1 :])


def tp_shard(name: str, tensor: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of ``tensor`` (a view; replicated weights come back whole)."""
    dim = tp_split_dim(name)
    if tp_size == 1 or dim is None:
        return tensor
    size = tp_shard_shape(name, tuple(tensor.shape), tp_size)[dim]
    return tensor.narrow(dim, tp_rank * size, size)


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor (or its TP shard) lives inside its bucket."""

    name: str
    shape: tuple[int, ...]
    offset: int
    """Elements from the start of the bucket."""

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


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """One pool's plan: dtype, TP layout and the ordered buckets."""

    pool: str
    dtype: str
    tp_size: int
    tp_rank: int
    buckets: tuple[Bucket, ...]

    @classmethod
    def build(
        cls,
        shapes: Iterable[tuple[str, tuple[int, ...]]],
        *,
        pool: str,
        dtype: str,
        bucket_mb: float,
        tp_size: int = 1,
        tp_rank: int = 0,
    ) -> SyncPlan:
        """Cut the tensors named in ``shapes`` (in that order) into buckets of at most ``bucket_mb``
        MiB of ``dtype``; a larger tensor gets a bucket of its own."""
        if dtype not in DTYPE_BYTES:
            raise PlanError(f"pool {pool}: dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        if not 0 <= tp_rank < tp_size:
            raise PlanError(f"pool {pool}: tp_rank {tp_rank} is not in [0, {tp_size})")
        limit = max(1, int(bucket_mb * 2**20) // DTYPE_BYTES[dtype])
        buckets: list[Bucket] = []
        slots: list[TensorSlot] = []
        filled = 0
        for name, shape in shapes:
            slot = TensorSlot(name, tp_shard_shape(name, tuple(shape), tp_size), filled)
            if slots and filled + slot.numel > limit:
                buckets.append(Bucket(len(buckets), tuple(slots), filled))
                slots, filled = [], 0
                slot = TensorSlot(slot.name, slot.shape, 0)
            slots.append(slot)
            filled += slot.numel
        if slots:
            buckets.append(Bucket(len(buckets), tuple(slots), filled))
        return cls(pool=pool, dtype=dtype, tp_size=tp_size, tp_rank=tp_rank, buckets=tuple(buckets))

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
            "tp_rank": self.tp_rank,
            "buckets": [
                [[slot.name, list(slot.shape), slot.offset] for slot in bucket.slots] for bucket in self.buckets
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyncPlan:
        buckets = []
        for index, slots in enumerate(data["buckets"]):
            parsed = tuple(TensorSlot(name, tuple(shape), offset) for name, shape, offset in slots)
            buckets.append(Bucket(index, parsed, sum(slot.numel for slot in parsed)))
        return cls(
            pool=data["pool"],
            dtype=data["dtype"],
            tp_size=data["tp_size"],
            tp_rank=data["tp_rank"],
            buckets=tuple(buckets),
        )

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def empty_bucket(self, bucket: Bucket, device: str = "cpu") -> torch.Tensor:
        """A buffer for ``bucket``, zero-filled so its pages are mapped now, not during the first sync."""
        import torch

        return torch.zeros(bucket.numel, dtype=self.torch_dtype(), device=device)

    def flatten(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Cast and copy this pool's shard of every tensor of ``bucket`` into ``out[:bucket.numel]``."""
        flat = out[: bucket.numel]
        for slot in bucket.slots:
            source = tensors.get(slot.name)
            if source is None:
                raise PlanError(f"pool {self.pool}: bucket {bucket.index} needs {slot.name}, which the trainer lacks")
            shard = tp_shard(slot.name, source, self.tp_size, self.tp_rank)
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
