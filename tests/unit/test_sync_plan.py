"""Sync plan bucketing, TP layout and the CTA rule of the NCCL sync group (pure logic, CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from asyncrl.sync.broadcast import NCCL_MAX_CTAS, cta_limits, gloo_options  # noqa: E402
from asyncrl.sync.plan import PlanError, SyncPlan  # noqa: E402
from asyncrl.sync.tp_layout import AttentionHeads  # noqa: E402


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (64, 32),
        "model.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.layers.0.self_attn.q_proj.bias": (32,),
        "model.layers.0.self_attn.k_proj.weight": (16, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 32),
        "model.layers.0.mlp.gate_proj.weight": (96, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 96),
        "model.layers.0.input_layernorm.weight": (32,),
        "model.norm.weight": (32,),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _plan(tensors, **kwargs) -> SyncPlan:
    return SyncPlan.build([(name, tuple(t.shape)) for name, t in tensors.items()], pool="p", **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bucket_mb", [0.004, 0.01, 64])
def test_flatten_unflatten_round_trip_in_order(dtype, bucket_mb):
    tensors = _tensors()
    plan = _plan(tensors, dtype=dtype, bucket_mb=bucket_mb)
    assert [slot.name for bucket in plan.buckets for slot in bucket.slots] == list(tensors)
    limit = bucket_mb * 2**20 / (4 if dtype == "float32" else 2)
    for bucket in plan.buckets:  # a bucket is over the limit only when one tensor alone is
        assert bucket.numel <= limit or len(bucket.slots) == 1
    received = {}
    for bucket in plan.buckets:
        flat = plan.flatten(bucket, tensors, plan.empty_bucket(bucket))
        assert flat.dtype == getattr(torch, dtype) and flat.numel() == bucket.numel
        received.update(SyncPlan.from_dict(plan.to_dict()).unflatten(bucket, flat.clone()))
    for name, tensor in tensors.items():
        assert torch.equal(received[name], tensor.to(getattr(torch, dtype))), name
    assert plan.nbytes == sum(t.numel() for t in tensors.values()) * (4 if dtype == "float32" else 2)


def test_plan_metadata_round_trips_through_plain_data():
    plan = _plan(_tensors(), dtype="float32", bucket_mb=0.01)
    assert SyncPlan.from_dict(plan.to_dict()) == plan
    assert len(plan.buckets) > 1


HEADS = AttentionHeads(num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # _tensors' q: 32 rows, k: 16
SHARDED_DIM = {"o_proj.weight": 1, "down_proj.weight": 1, "norm.weight": None, "layernorm.weight": None}


def _received_by_rank(plan: SyncPlan, tensors) -> list[dict[str, torch.Tensor]]:
    """What each TP rank stages after one sync through plain data (the plan as a receiver rebuilds it)."""
    receiving = SyncPlan.from_dict(plan.to_dict())
    got: list[dict[str, torch.Tensor]] = [{} for _ in range(plan.tp_size)]
    for bucket in plan.buckets:
        flat = plan.flatten(bucket, tensors, plan.empty_bucket(bucket)).clone()
        got[bucket.tp_rank].update(receiving.unflatten(receiving.buckets[bucket.index], flat))
    return got


@pytest.mark.parametrize("bucket_mb", [0.004, 64])
def test_a_tp_plan_gives_each_rank_buckets_of_only_its_shards(bucket_mb):
    tensors = _tensors()
    plan = _plan(tensors, dtype="float32", bucket_mb=bucket_mb, tensor_parallel=2, heads=HEADS)
    assert SyncPlan.from_dict(plan.to_dict()) == plan
    assert [bucket.index for bucket in plan.buckets] == list(range(len(plan.buckets)))  # unique on one link
    assert [bucket.tp_rank for bucket in plan.buckets] == sorted(bucket.tp_rank for bucket in plan.buckets)
    got = _received_by_rank(plan, tensors)
    for name, tensor in tensors.items():
        assert all(list(rank) == list(tensors) for rank in got)  # every rank gets every tensor, in order
        dim = next((d for suffix, d in SHARDED_DIM.items() if name.endswith(suffix)), 0)
        if dim is None:
            assert all(torch.equal(rank[name], tensor) for rank in got), name  # replicated
        elif name.endswith("k_proj.weight"):  # one KV head for two ranks: vLLM replicates it
            assert all(torch.equal(rank[name], tensor) for rank in got), name
        else:
            assert torch.equal(torch.cat([rank[name] for rank in got], dim=dim), tensor), name
            assert got[0][name].shape[dim] == tensor.shape[dim] // 2, name


def test_a_tp_rank_receives_about_a_share_of_the_sharded_bytes():
    tensors = _tensors()
    whole = _plan(tensors, dtype="bfloat16", bucket_mb=0.01)
    plan = _plan(tensors, dtype="bfloat16", bucket_mb=0.01, tensor_parallel=2, heads=HEADS)
    replicated = sum(t.numel() for n, t in tensors.items() if n.endswith(("norm.weight", "k_proj.weight"))) * 2
    for rank in range(2):
        assert plan.rank_nbytes(rank) == (whole.nbytes - replicated) // 2 + replicated
        assert all(bucket.numel * 2 <= 0.01 * 2**20 or len(bucket.slots) == 1 for bucket in plan.buckets_of(rank))
    assert plan.nbytes == plan.rank_nbytes(0) + plan.rank_nbytes(1)


def test_a_tp_plan_refuses_what_it_cannot_split_naming_pool_and_tensor():
    tensors = _tensors()
    with pytest.raises(PlanError, match=r"pool p: model\.embed_tokens\.weight: the padded vocabulary"):
        _plan(tensors, dtype="float32", bucket_mb=1, tensor_parallel=3, heads=AttentionHeads(3, 1, 16))
    del tensors["model.embed_tokens.weight"]
    with pytest.raises(PlanError, match=r"pool p: model\.layers\.0\.self_attn\.q_proj\.weight: 32 rows"):
        _plan(tensors, dtype="float32", bucket_mb=1, tensor_parallel=3, heads=AttentionHeads(3, 1, 16))
    with pytest.raises(PlanError, match="needs the model's attention heads"):
        _plan(tensors, dtype="float32", bucket_mb=1, tensor_parallel=2)


def test_missing_tensor_names_pool_bucket_and_tensor():
    tensors = _tensors()
    plan = _plan(tensors, dtype="float32", bucket_mb=64)
    del tensors["model.norm.weight"]
    with pytest.raises(PlanError, match=r"pool p: bucket 0 needs model\.norm\.weight"):
        plan.flatten(plan.buckets[0], tensors, plan.empty_bucket(plan.buckets[0]))


@pytest.mark.parametrize(
    ("sm_count", "sm_fraction", "expected"),
    [
        (132, 0.1, (6, 13)),  # H100 SXM: 13 of 132 SMs
        (132, 1.0, (16, NCCL_MAX_CTAS)),  # capped at NCCL's channel limit
        (108, 0.05, (2, 5)),  # A100
        (16, 0.01, (1, 1)),  # never below one CTA
    ],
)
def test_cta_limits_follow_the_documented_rule(sm_count, sm_fraction, expected):
    limits = cta_limits(sm_count, sm_fraction)
    assert (limits.min_ctas, limits.max_ctas) == expected
    assert limits.max_ctas <= max(1, sm_count * sm_fraction)


@pytest.mark.parametrize(("sm_count", "sm_fraction"), [(0, 0.5), (132, 0.0), (132, 1.5)])
def test_cta_limits_reject_bad_inputs(sm_count, sm_fraction):
    with pytest.raises(ValueError):
        cta_limits(sm_count, sm_fraction)


def test_gloo_options_is_the_cpu_twin():
    options = gloo_options(7.0, sm_count=132, sm_fraction=0.1)
    assert options._timeout.total_seconds() == 7.0
