"""The tensor-parallel shard rule against vLLM's own layers and weight loaders (CPU, no process group).

vLLM's parallel layers read their rank and size from the TP process group; a real group of two ranks
would need two processes per case. The layers are built here with a stand-in group object that only
answers ``rank_in_group``/``world_size`` (no collective runs while building and loading), so each
rank's parameter is exactly what vLLM's loader makes of the full checkpoint tensor on that rank.
"""

from __future__ import annotations

import types
from unittest import mock

import pytest

torch = pytest.importorskip("torch")

from asyncrl.sync.tp_layout import (  # noqa: E402
    AttentionHeads,
    TPLayoutError,
    padded_vocab_rows,
    shard_of,
)

HIDDEN, INTERMEDIATE, HEAD_DIM = 128, 256, 64


def _narrow(tensor, shard):
    return tensor if shard.dim is None else tensor.narrow(shard.dim, shard.start, shard.length)


def _vllm_rank(tp_size: int, tp_rank: int):
    """vLLM's layer modules building for rank ``tp_rank`` of ``tp_size`` (see the module docstring)."""
    import vllm.distributed.parallel_state as parallel_state
    from vllm.config import VllmConfig, set_current_vllm_config

    group = types.SimpleNamespace(rank_in_group=tp_rank, world_size=tp_size)
    stack = mock.patch.object(parallel_state, "_TP", group)
    config = set_current_vllm_config(VllmConfig())
    return config, stack


def _checkpoint(heads: AttentionHeads, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q_rows, kv_rows = heads.num_attention_heads * HEAD_DIM, heads.num_key_value_heads * HEAD_DIM
    shapes = {
        "model.embed_tokens.weight": (vocab, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": (q_rows, HIDDEN),
        "model.layers.0.self_attn.q_proj.bias": (q_rows,),
        "model.layers.0.self_attn.k_proj.weight": (kv_rows, HIDDEN),
        "model.layers.0.self_attn.k_proj.bias": (kv_rows,),
        "model.layers.0.self_attn.v_proj.weight": (kv_rows, HIDDEN),
        "model.layers.0.self_attn.v_proj.bias": (kv_rows,),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, q_rows),
        "model.layers.0.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (vocab, HIDDEN),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


CASES = [  # (attention heads, kv heads, vocab, tp): the tiny model's 2/1 heads replicate k/v at tp 2
    (2, 1, 512, 2),
    (4, 2, 500, 2),
    (4, 4, 500, 4),
    (4, 1, 520, 4),
    (8, 2, 1000, 8),
]


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "vocab", "tp_size"), CASES)
def test_each_ranks_shard_is_what_vllms_loader_puts_in_that_ranks_layer(num_heads, num_kv_heads, vocab, tp_size):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    heads = AttentionHeads(num_heads, num_kv_heads, HEAD_DIM)
    full = _checkpoint(heads, vocab)

    def ours(name, rank):
        return _narrow(full[name], shard_of(name, tuple(full[name].shape), heads, tp_size, rank))

    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    for rank in range(tp_size):
        config, group = _vllm_rank(tp_size, rank)
        with config, group:
            qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads, num_kv_heads, bias=True)
            gate_up = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE] * 2, bias=False)
            o_proj = RowParallelLinear(num_heads * HEAD_DIM, HIDDEN, bias=False)
            down = RowParallelLinear(INTERMEDIATE, HIDDEN, bias=False)
            embed = VocabParallelEmbedding(vocab, HIDDEN)
            head = ParallelLMHead(vocab, HIDDEN)
        for attr in ("weight", "bias"):
            param = getattr(qkv, attr)
            for shard_id in ("q", "k", "v"):
                qkv.weight_loader(param, full[f"{attr_name(attn, shard_id)}.{attr}"], shard_id)
            expected = torch.cat([ours(f"{attr_name(attn, s)}.{attr}", rank) for s in ("q", "k", "v")])
            assert torch.equal(param.data, expected), (rank, attr)
        for index, part in enumerate(("gate_proj", "up_proj")):
            gate_up.weight_loader(gate_up.weight, full[f"{mlp}.{part}.weight"], index)
        expected = torch.cat([ours(f"{mlp}.gate_proj.weight", rank), ours(f"{mlp}.up_proj.weight", rank)])
        assert torch.equal(gate_up.weight.data, expected), rank
        for layer, name in ((o_proj, f"{attn}.o_proj.weight"), (down, f"{mlp}.down_proj.weight")):
            layer.weight_loader(layer.weight, full[name])
            assert torch.equal(layer.weight.data, ours(name, rank)), (rank, name)
        for layer, name in ((embed, "model.embed_tokens.weight"), (head, "lm_head.weight")):
            layer.weight_loader(layer.weight, full[name])
            shard = ours(name, rank)
            assert layer.weight.shape[0] == padded_vocab_rows(vocab, tp_size), (rank, name)
            assert torch.equal(layer.weight.data[: shard.shape[0]], shard), (rank, name)
            assert not layer.weight.data[shard.shape[0] :].any(), (rank, name)  # padding rows stay zero


def attr_name(attn: str, shard_id: str) -> str:
    return f"{attn}.{shard_id}_proj"


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "vocab", "tp_size"), CASES)
def test_shards_concatenate_back_to_the_whole_tensor(num_heads, num_kv_heads, vocab, tp_size):
    heads = AttentionHeads(num_heads, num_kv_heads, HEAD_DIM)
    replicas = max(1, tp_size // num_kv_heads)
    for name, tensor in _checkpoint(heads, vocab, seed=1).items():
        shards = [shard_of(name, tuple(tensor.shape), heads, tp_size, rank) for rank in range(tp_size)]
        if shards[0].dim is None:
            assert all(shard.dim is None for shard in shards), name
            continue
        if name.rsplit(".", 2)[-2] in ("k_proj", "v_proj"):
            shards = shards[::replicas]  # replicated KV heads: every replicas-th rank holds a new head
        parts = [_narrow(tensor, shard) for shard in shards]
        assert torch.equal(torch.cat(parts, dim=shards[0].dim), tensor), name


def test_replicated_kv_heads_are_the_same_on_the_ranks_sharing_them():
    heads = AttentionHeads(4, 1, HEAD_DIM)
    shards = [shard_of("model.layers.3.self_attn.k_proj.weight", (HEAD_DIM, HIDDEN), heads, 4, r) for r in range(4)]
    assert {(shard.start, shard.length) for shard in shards} == {(0, HEAD_DIM)}


@pytest.mark.parametrize(
    ("name", "shape", "heads", "tp_size", "match"),
    [
        ("model.layers.0.self_attn.k_proj.weight", (3 * 64, 128), AttentionHeads(6, 3, 64), 2, "3 key-value heads"),
        ("model.layers.0.self_attn.k_proj.weight", (2 * 64, 128), AttentionHeads(6, 2, 64), 3, "replicated evenly"),
        ("model.layers.0.self_attn.q_proj.weight", (3 * 64, 128), AttentionHeads(3, 1, 64), 2, "3 attention heads"),
        ("model.layers.0.mlp.down_proj.weight", (128, 250), AttentionHeads(2, 1, 64), 4, "dim 1 of shape"),
        ("model.embed_tokens.weight", (500, 128), AttentionHeads(2, 1, 64), 3, "padded vocabulary"),
        ("model.layers.0.mlp.experts.0.w1.weight", (8, 8), AttentionHeads(2, 1, 64), 2, "no tensor-parallel rule"),
    ],
)
def test_a_tensor_that_cannot_be_split_is_refused_by_name(name, shape, heads, tp_size, match):
    with pytest.raises(TPLayoutError, match=match) as raised:
        shard_of(name, shape, heads, tp_size, 0)
    assert name in str(raised.value) or "vocabulary" in match


def test_tp_one_is_the_whole_tensor_whatever_the_name():
    heads = AttentionHeads(3, 3, 64)
    assert shard_of("model.layers.0.mlp.experts.0.w1.weight", (8, 8), heads, 1, 0).dim is None


def test_heads_from_a_config_default_head_dim():
    config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=None, hidden_size=256)
    assert AttentionHeads.from_config(config) == AttentionHeads(4, 4, 64)


def test_a_pools_tensor_parallel_reaches_its_link_and_its_engines(tmp_path):
    from asyncrl.config import load_config
    from asyncrl.weight_sync import pool_links
    from rollout.worker import _tensor_parallel

    path = tmp_path / "pools.yaml"
    path.write_text(
        "resources:\n  pools:\n"
        "    - {name: trainers, role: trainer, cpus: 1}\n"
        "    - {name: whole, role: rollout, count: 1, cpus: 1}\n"
        "    - {name: tp2, role: rollout, count: 2, cpus: 1, gpus: 2, tensor_parallel: 2}\n"
    )
    cfg = load_config(path)
    assert [(link.name, link.engines, link.tensor_parallel) for link in pool_links(cfg)] == [
        ("whole", [0], 1),
        ("tp2", [1, 2], 2),
    ]
    assert [_tensor_parallel(cfg, f"rollout-{index}") for index in range(3)] == [1, 2, 2]
