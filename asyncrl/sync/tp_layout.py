"""Which part of each Qwen2/Llama checkpoint weight a vLLM tensor-parallel rank holds (pure logic, no torch).

The rules follow vLLM's own weight loaders (``vllm/model_executor/layers/linear.py`` and
``vocab_parallel_embedding.py``), checked against them in tests/unit/test_tp_layout.py:

- column-parallel ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` (weights and biases) split
  their output rows (dim 0) into equal contiguous parts, rank ``r`` taking part ``r``;
- ``k_proj``/``v_proj`` split by key-value heads; with fewer KV heads than ranks vLLM replicates them:
  each rank holds one head, head ``r // (tp / num_key_value_heads)``;
- row-parallel ``o_proj``/``down_proj`` weights split their input columns (dim 1); their biases are
  whole on every rank (vLLM adds them once, on rank 0);
- ``embed_tokens``/``lm_head`` split the vocabulary (dim 0): vLLM pads it to a multiple of 64, each rank
  holds ``padded / tp`` rows, and rank ``r`` gets checkpoint rows ``[r * per, (r + 1) * per)`` cut at the
  real vocabulary (the last ranks' padding rows are zeros that no checkpoint row fills);
- norms are whole on every rank.

Any other tensor has no rule here: at ``tp > 1`` it raises ``TPLayoutError`` naming it, rather than
sending an engine a shard it would load wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VOCAB_PADDING = 64
"""vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``: the vocabulary is padded to a multiple of it before the TP split."""

_HEAD_SPLIT = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv"}
_COLUMN = ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias")
_ROW = ("o_proj.weight", "down_proj.weight")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")
_REPLICATED = ("norm.weight", "norm.bias", "o_proj.bias", "down_proj.bias", "rotary_emb.inv_freq")


class TPLayoutError(ValueError):
    """A tensor this layout cannot split for the requested tensor-parallel size; names the tensor."""


@dataclass(frozen=True, slots=True)
class AttentionHeads:
    """What the split of q/k/v needs beyond the tensors' shapes (from the model's config)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> AttentionHeads:
        """From a Hugging Face ``PretrainedConfig`` (or anything with its attribute names)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


@dataclass(frozen=True, slots=True)
class Shard:
    """One rank's part of a tensor: ``length`` entries of dimension ``dim`` from ``start``; ``dim`` None: whole."""

    dim: int | None
    start: int = 0
    length: int = 0

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(shape)
        return (*shape[: self.dim], self.length, *shape[self.dim + 1 :])


WHOLE = Shard(None)


def padded_vocab_rows(vocab_size: int, tp_size: int) -> int:
    """Rows of ``embed_tokens``/``lm_head`` each rank's vLLM layer holds (the padded vocabulary / ``tp_size``)."""
    padded = -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    if padded % tp_size:
        raise TPLayoutError(f"the padded vocabulary ({padded} rows) does not split across {tp_size} TP ranks")
    return padded // tp_size


def shard_of(name: str, shape: tuple[int, ...], heads: AttentionHeads, tp_size: int, tp_rank: int) -> Shard:
    """Rank ``tp_rank``'s part of checkpoint tensor ``name`` (of ``shape``) at tensor-parallel size ``tp_size``."""
    if not 0 <= tp_rank < tp_size:
        raise TPLayoutError(f"{name}: tp_rank {tp_rank} is not in [0, {tp_size})")
    if tp_size == 1 or name.endswith(_REPLICATED):
        return WHOLE
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if module in _HEAD_SPLIT and name.endswith((".weight", ".bias")):
        return _head_shard(name, shape, heads, tp_size, tp_rank, kv=_HEAD_SPLIT[module] == "kv")
    if name.endswith(_COLUMN):
        return _even(name, shape, 0, tp_size, tp_rank)
    if name.endswith(_ROW):
        return _even(name, shape, 1, tp_size, tp_rank)
    if name.endswith(_VOCAB):
        vocab = shape[0]
        try:
            rows = padded_vocab_rows(vocab, tp_size)
        except TPLayoutError as err:
            raise TPLayoutError(f"{name}: {err}") from None
        start = min(tp_rank * rows, vocab)
        return Shard(0, start, min((tp_rank + 1) * rows, vocab) - start)
    raise TPLayoutError(
        f"{name}: no tensor-parallel rule for it (Qwen2/Llama attention, MLP, embeddings and norms only); "
        f"use tensor_parallel=1 for this model"
    )


def _even(name: str, shape: tuple[int, ...], dim: int, tp_size: int, tp_rank: int) -> Shard:
    if len(shape) <= dim or shape[dim] % tp_size:
        raise TPLayoutError(f"{name}: dim {dim} of shape {list(shape)} does not split evenly across {tp_size} TP ranks")
    length = shape[dim] // tp_size
    return Shard(dim, tp_rank * length, length)


def _head_shard(
    name: str, shape: tuple[int, ...], heads: AttentionHeads, tp_size: int, tp_rank: int, *, kv: bool
) -> Shard:
    total = heads.num_key_value_heads if kv else heads.num_attention_heads
    if shape[0] != total * heads.head_dim:
        raise TPLayoutError(f"{name}: {shape[0]} rows, expected {total} heads x head_dim {heads.head_dim}")
    if kv and total < tp_size:
        if tp_size % total:
            raise TPLayoutError(
                f"{name}: {total} key-value heads cannot be replicated evenly over {tp_size} TP ranks "
                f"(vLLM needs tensor_parallel to be a multiple of num_key_value_heads)"
            )
        head = tp_rank // (tp_size // total)
        return Shard(0, head * heads.head_dim, heads.head_dim)
    if total % tp_size:
        kind = "key-value" if kv else "attention"
        raise TPLayoutError(f"{name}: {total} {kind} heads do not split evenly across {tp_size} TP ranks")
    length = total // tp_size * heads.head_dim
    return Shard(0, tp_rank * length, length)
