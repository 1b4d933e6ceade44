"""Per-pool weight sync settings: resources.pools[i].sync_transport / sync_bucket_mb / dtype are validated
naming the key and its allowed values, and each rollout pool's link resolves them (else sync.* and model.dtype)."""

import pytest

from asyncrl.config import ConfigError, load_config
from asyncrl.placement import Slot
from asyncrl.weight_sync import pool_links

HETERO = """
sync: {transport: broadcast, bucket_mb: 8}
resources:
  pools:
    - {name: trainers, role: trainer, cpus: 1}
    - {name: fp32, role: rollout, count: 2, cpus: 1}
    - {name: half, role: rollout, cpus: 1, dtype: float16, sync_transport: store, sync_bucket_mb: 0.5}
"""


@pytest.fixture
def hetero(tmp_path):
    path = tmp_path / "hetero.yaml"
    path.write_text(HETERO)
    return path


def test_each_rollout_pool_gets_its_dtype_transport_bucket_size_and_engines(hetero):
    links = pool_links(load_config(hetero))
    resolved = [(link.name, link.engines, link.dtype, link.transport, link.bucket_mb) for link in links]
    assert resolved == [("fp32", [0, 1], "float32", "broadcast", 8.0), ("half", [2], "float16", "store", 0.5)]
    assert [link.live for link in links] == [[0, 1], [2]]


def test_a_pools_engines_get_its_dtype_and_the_trainer_keeps_model_dtype(hetero):
    cfg = load_config(hetero)
    trainers, fp32, half = (Slot(pool=pool, bundle_index=0, placement_group=None) for pool in cfg.resources.pools)
    assert [slot.worker_config(cfg).model.dtype for slot in (trainers, fp32, half)] == ["float32", "float32", "float16"]
    assert cfg.model.dtype == "float32"  # the job's config is left as it was


def test_one_pool_default_is_the_rollout_pool_of_sync_settings():
    cfg = load_config(None, ["rollout.num_workers=3", "sync.transport=store", "sync.bucket_mb=4"])
    (link,) = pool_links(cfg)
    assert (link.name, link.engines, link.dtype, link.transport, link.bucket_mb) == (
        "rollout",
        [0, 1, 2],
        "float32",
        "store",
        4.0,
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("resources.pools.2.sync_transport=nccl", "resources.pools[2].sync_transport must be one of broadcast, store"),
        ("resources.pools.2.sync_bucket_mb=-1", "resources.pools[2].sync_bucket_mb must be >= 0"),
        ("resources.pools.2.dtype=int8", "resources.pools[2].dtype must be one of float32, bfloat16, float16"),
        ("resources.pools.0.dtype=float16", "resources.pools[0].dtype must be one of float32, bfloat16;"),
        ("resources.pools.0.sync_transport=store", "resources.pools[0].sync_transport is for rollout pools"),
        ("resources.pools.0.sync_bucket_mb=2", "resources.pools[0].sync_bucket_mb is for rollout pools"),
        ("sync.transport=object_store", "resources.pools[2].sync_transport='store' needs a bucketed sync.transport"),
    ],
)
def test_bad_pool_sync_settings_name_the_key(hetero, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(hetero, [override])
    assert fragment in str(info.value)
