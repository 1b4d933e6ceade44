"""A weight update for a live vLLM engine, prepared beside the running model and swapped in between two steps.

vLLM's own reload (``worker.reload_weights``) re-runs every layer's loader and post-processing, and it
must run under the engine lock: ~100 ms for a 126 MB model during which nothing decodes. The set of
tensors a sync delivers is fixed (the sync plan), so the place of each one in the engine is found
once, at the first update: vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
(``packed_modules_mapping``), so a tensor's place is a row range of a fused parameter. Each update:

1. ``prepare`` (no engine lock; the engine keeps decoding): copies every tensor into its row range
   of a spare buffer per parameter that the live model does not read, and, on CPU, builds each
   linear layer's GEMM handle from it: vLLM's CPU backend packs a linear's weight into a oneDNN (or
   sgl, zentorch) handle when it loads, and the forward reads the handle, not the parameter;
2. ``commit`` (under the engine lock, between two steps): on CPU, makes the spare buffers the
   parameters (``param.data = spare``) and the new handles the layers': pointer assignments, no bytes
   moved; the buffers they replace are the next update's spares. Elsewhere (CUDA: a captured graph
   holds the parameters' addresses) it copies each spare into its parameter, at device bandwidth.

The result equals ``reload_weights`` on the same tensors (tests/integration/test_staged_weights.py).
A model whose parameters the names do not cover exactly, or a shape that does not fit, raises
``StagingUnsupported`` when the map is built; the engine then keeps using vLLM's reload.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


PADDED_VOCAB_MODULES = frozenset({"VocabParallelEmbedding", "ParallelLMHead"})
"""Modules whose parameter may have more rows than the checkpoint tensor (vLLM pads the vocabulary)."""


class StagingUnsupported(RuntimeError):
    """The engine's model cannot be updated by staging (names the parameter or tensor that does not fit)."""


@dataclass(slots=True)
class _Target:
    """One engine parameter and where the delivered tensors go in it."""

    module: Any
    attr: str
    """``weight`` or ``bias``."""
    shape: tuple[int, ...]
    dtype: Any
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Delivered tensor name -> (first row, rows) in this parameter."""
    spare: Any = None
    """The buffer ``prepare`` fills; the live model never reads it."""
    packed: tuple = ()
    """Layers holding this weight whose forward reads a GEMM handle built from it (CPU linear layers, the
    embedding and a tied LM head: two modules, one parameter, a handle each)."""
    removed: bool = False
    """The live parameter is empty: vLLM dropped it after packing it into the handle."""
    live: Any = None
    """What the handle was last built from (packed and removed only: the parameter holds nothing)."""
    handle: Any = None
    """The handle ``prepare`` built from ``spare``."""


class StagedWeights:
    """The map from delivered tensor names to a vLLM model's parameters, with the spare buffers."""

    def __init__(self, model: Any, names_and_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        import torch
        from vllm.platforms import current_platform

        self.swap = current_platform.is_cpu()
        self.pack_in_place = self.swap and not current_platform.is_zen_cpu()
        """Build a packed weight's handle straight from the delivered tensors when they are contiguous."""
        packed_names = getattr(model, "packed_modules_mapping", {}) or {}
        # q_proj -> (qkv_proj, 0), k_proj -> (qkv_proj, 1), ...: the fused module and the shard's position.
        shard_of = {part: (fused, i) for fused, parts in packed_names.items() for i, part in enumerate(parts)}
        params = dict(model.named_parameters(remove_duplicate=False))
        holders: dict[int, list] = {}
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None:
                    holders.setdefault(id(param), []).append(module)
        by_id: dict[int, _Target] = {}
        self.targets: dict[str, _Target] = {}
        """Delivered tensor name -> its target; a fused target appears under each of its shards."""
        self.skipped: set[str] = set()
        """Delivered names that alias another parameter (a tied LM head): vLLM's loader skips them too."""
        shards: dict[str, list[tuple[int, str, int]]] = {}
        for name, shape in names_and_shapes:
            module_path, _, attr = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            position = 0
            if leaf in shard_of:
                fused, position = shard_of[leaf]
                module_path = f"{parent}.{fused}" if parent else fused
            param_name = f"{module_path}.{attr}"
            param = params.get(param_name)
            if param is None:
                if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                    self.skipped.add(name)
                    continue
                raise StagingUnsupported(f"{name}: no engine parameter {param_name}")
            shards.setdefault(param_name, []).append((position, name, shape[0] if shape else 1))
            target = by_id.get(id(param))
            if target is None:
                module = model.get_submodule(module_path)
                target = _Target(module, attr, _param_shape(module, attr, param), param.dtype)
                if self.swap and attr == "weight":
                    target.packed = tuple(held for held in holders.get(id(param), ()) if hasattr(held, "cpu_linear"))
                target.removed = param.numel() == 0
                by_id[id(param)] = target
            if tuple(shape[1:]) != target.shape[1:]:
                raise StagingUnsupported(f"{name}: shape {list(shape)} does not fit {param_name} {list(target.shape)}")
            self.targets[name] = target
        for param_name, parts in shards.items():  # rows in shard order (q, k, v), whatever the delivery order
            target, first = self.targets[parts[0][1]], 0
            for _, name, rows in sorted(parts):
                target.rows[name] = (first, rows)
                first += rows
            padded = first < target.shape[0] and type(target.module).__name__ in PADDED_VOCAB_MODULES
            if first != target.shape[0] and not padded:
                raise StagingUnsupported(f"{param_name}: the tensors fill {first} of its {target.shape[0]} rows")
        covered = {id(target.module.get_parameter(target.attr)) for target in by_id.values()}
        missing = [name for name, param in params.items() if id(param) not in covered]
        if missing:
            raise StagingUnsupported(f"no delivered tensor for engine parameter(s) {', '.join(missing[:4])}")
        self._unique = list(by_id.values())
        for target in self._unique:
            param = target.module.get_parameter(target.attr)
            if target.removed:  # two buffers, zero-filled so their pages are mapped now, not during a sync
                target.spare, target.live = (torch.zeros(target.shape, dtype=target.dtype) for _ in range(2))
            else:  # a copy of the live values, so rows no tensor delivers (vocabulary padding) keep them
                target.spare = param.data.clone()
        self.names = frozenset(self.targets) | self.skipped

    def prepare(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the tensors into the spare buffers and build the new GEMM handles; the live model is untouched.

        A packed weight whose tensors lie back to back in the caller's memory, in row order (a bucket holds
        ``gate_proj`` then ``up_proj``; ``o_proj`` alone), is packed straight from there: the handle copies
        what it needs, so the spare is skipped (not with zentorch, whose handle may read the weight later)."""
        import torch

        seen, pieces, destinations, sources = set(), {}, [], []
        for name, tensor in named_tensors:
            target = self.targets.get(name)
            if target is None:
                if name in self.skipped:
                    continue
                raise StagingUnsupported(f"{name}: not in the tensors this map was built for")
            first, rows = target.rows[name]
            view = tensor.view(rows, *target.shape[1:])
            if target.removed and self.pack_in_place and view.dtype == target.dtype:
                pieces.setdefault(id(target), []).append((first, view))
            else:
                destinations.append(target.spare.narrow(0, first, rows))
                sources.append(view)
            seen.add(name)
        if len(seen) != len(self.targets):
            missing = sorted(set(self.targets) - seen)
            raise StagingUnsupported(f"the update lacks {len(missing)} tensor(s), e.g. {missing[0]}")
        # One call for every copy: the engine's stepping thread waits for the GIL at each return to Python.
        torch._foreach_copy_(destinations, sources)
        for target in self._unique:
            if not target.packed:
                continue
            source = target.spare
            if id(target) in pieces:
                parts = sorted(pieces[id(target)], key=lambda part: part[0])
                source = _back_to_back(parts, target.shape)
                if source is None:
                    for first, view in parts:
                        target.spare.narrow(0, first, view.shape[0]).copy_(view)
                    source = target.spare
            target.handle = _cpu_gemm_handle(source)

    def commit(self) -> None:
        """Make the prepared weights live (call between two engine steps, under the engine lock)."""
        for target in self._unique:
            param = target.module.get_parameter(target.attr)
            if not self.swap:
                param.data.copy_(target.spare)
                continue
            for module in target.packed:
                module.cpu_linear = target.handle
            target.handle = None
            if target.removed:
                # The parameter stays empty; the handle may read the buffer it was built from (zentorch
                # without prepacking), so that buffer stays untouched until the next commit replaces it.
                target.live, target.spare = target.spare, target.live
            else:
                previous = param.data
                param.data = target.spare
                target.spare = previous


def _param_shape(module: Any, attr: str, param: Any) -> tuple[int, ...]:
    """The parameter's logical shape (a packed CPU linear keeps an empty placeholder instead of its weight)."""
    if param.numel() or attr != "weight":
        return tuple(param.shape)
    return (int(module.output_size_per_partition), int(module.input_size_per_partition))


def _back_to_back(parts: list[tuple[int, torch.Tensor]], shape: tuple[int, ...]) -> torch.Tensor | None:
    """One tensor of ``shape`` over ``parts`` (row ranges in order) if they are contiguous and adjacent in one
    storage; None otherwise."""
    import torch

    first_view = parts[0][1]
    storage, end = first_view.untyped_storage().data_ptr(), first_view.data_ptr()
    for _, view in parts:
        if not view.is_contiguous() or view.data_ptr() != end or view.untyped_storage().data_ptr() != storage:
            return None
        end += view.numel() * view.element_size()
    whole = torch.empty(0, dtype=first_view.dtype, device=first_view.device)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return whole.set_(first_view.untyped_storage(), first_view.storage_offset(), shape, stride)


def _cpu_gemm_handle(weight: torch.Tensor) -> Any:
    """The ``cpu_linear`` callable vLLM's CPU backend would build for a layer holding ``weight``.

    Built on a stand-in layer so the live one is untouched; ``remove_weight=False`` leaves the stand-in's
    weight alone (the live layer already dropped or keeps its own)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    stand_in = types.SimpleNamespace(weight=weight, bias=None)
    dispatch_cpu_unquantized_gemm(stand_in, remove_weight=False)
    return stand_in.cpu_linear
