"""Sync plan bucketing, TP layout and the CTA rule of the NCCL sync group (pure logic, CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from asyncrl.sync.broadcast import NCCL_MAX_CTAS, cta_limits, gloo_options  # noqa: E402
from asyncrl.sync.plan import PlanError, SyncPlan, tp_shard, tp_shard_shape  # noqa: E402


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


def test_tp_shards_concatenate_back_to_the_full_weight():
    tensors = _tensors()
    tp_size = 2
    for name, tensor in tensors.items():
        shards = [tp_shard(name, tensor, tp_size, rank) for rank in range(tp_size)]
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(shards, dim=1), tensor), name
        elif name.endswith(("norm.weight", "layernorm.weight")):
            assert all(torch.equal(shard, tensor) for shard in shards), name  # replicated
        else:
            assert torch.equal(torch.cat(shards, dim=0), tensor), name


def test_tp_plan_carries_each_ranks_shard():
    tensors = _tensors()
    plans = [_plan(tensors, dtype="float32", bucket_mb=64, tp_size=2, tp_rank=rank) for rank in range(2)]
    name = "model.layers.0.mlp.down_proj.weight"
    got = []
    for plan in plans:
        (bucket,) = plan.buckets
        got.append(dict(plan.unflatten(bucket, plan.flatten(bucket, tensors, plan.empty_bucket(bucket))))[name])
    assert torch.equal(torch.cat(got, dim=1), tensors[name])


def test_uneven_tp_split_names_the_tensor():
    with pytest.raises(PlanError, match="k_proj.weight"):
        tp_shard_shape("model.layers.0.self_attn.k_proj.weight", (3, 32), 2)


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
