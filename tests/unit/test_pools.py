"""resources.pools: validation naming the key, the single-machine default, and the fit check against nodes."""

import subprocess
import sys
from pathlib import Path

import pytest

from asyncrl.config import ConfigError, load_config
from asyncrl.placement import PlacementError, bundle, check_fits, pools

ROOT = Path(__file__).parents[2]
POOLS = """
resources:
  pools:
    - {name: trainers, role: trainer, cpus: 1, resources: {trainer_node: 1}}
    - {name: rollouts, role: rollout, count: 2, cpus: 1, accelerator_type: L4, resources: {rollout_node: 0.5}}
"""


@pytest.fixture
def pooled(tmp_path):
    path = tmp_path / "pools.yaml"
    path.write_text(POOLS)
    return path


def test_pools_set_the_rollout_worker_count(pooled):
    cfg = load_config(pooled)
    assert cfg.rollout.num_workers == 2
    assert bundle(cfg.resources.pools[1]) == {"CPU": 1.0, "rollout_node": 0.5, "accelerator_type:L4": 0.001}


def test_no_pools_is_the_single_machine_default():
    cfg = load_config(None, ["rollout.num_workers=3", "rollout.threads=2", "trainer.threads=1"])
    assert [(p.role, p.count, p.cpus) for p in pools(cfg)] == [("trainer", 1, 1.0), ("rollout", 3, 2.0)]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("resources.pools.1.strategy=CLOSE", "resources.pools[1].strategy must be one of PACK, SPREAD, STRICT_PACK"),
        ("resources.pools.0.role=rollout", "exactly one pool with role=trainer"),
        ("resources.pools.1.count=0", "resources.pools[1].count must be >= 1"),
        ("resources.pools.1.resources.rollout_node=0", "resources.pools[1].resources.rollout_node must be > 0"),
        ("resources.pools.1.tensor_parallel=0", "resources.pools[1].tensor_parallel must be >= 1"),
        (
            ["resources.pools.1.gpus=1", "resources.pools.1.tensor_parallel=2"],
            "resources.pools[1].gpus (1.0) must be >= ",
        ),
        ("resources.pools.1.strtegy=PACK", "did you mean 'resources.pools[1].strategy'"),
        ("resources.pools.5.count=1", "resources.pools has 2 item(s), no index 5"),
    ],
)
def test_bad_pools_name_the_key(pooled, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(pooled, override if isinstance(override, list) else [override])
    assert fragment in str(err.value)


def test_a_missing_resource_label_is_named(pooled):
    nodes = [{"CPU": 4.0, "trainer_node": 1.0, "accelerator_type:L4": 1.0}]
    with pytest.raises(PlacementError, match="pool 'rollouts' needs resource 'rollout_node', which no node"):
        check_fits(pools(load_config(pooled)), nodes)


def test_fit_checks_sizes_spread_and_totals(pooled):
    cfg = load_config(pooled)
    labels = {"trainer_node": 1.0, "rollout_node": 1.0, "accelerator_type:L4": 1.0}
    check_fits(pools(cfg), [{"CPU": 3.0, **labels}])  # fits on one node
    with pytest.raises(PlacementError, match="CPU: 3 needed, 2 in the cluster"):
        check_fits(pools(cfg), [{"CPU": 2.0, **labels}])
    spread = load_config(cfg_path := pooled, ["resources.pools.1.strategy=STRICT_SPREAD"])
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):
        check_fits(pools(spread), [{"CPU": 8.0, **labels}])
    gpu = load_config(cfg_path, ["resources.pools.1.gpus=2"])
    with pytest.raises(PlacementError, match="needs 2 GPU per worker, but the largest node has 1"):
        check_fits(pools(gpu), [{"CPU": 8.0, "GPU": 1.0, **labels}])


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs" / "gpu").glob("*.yaml")))
def test_gpu_recipes_validate_with_config_show(recipe):
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "config", "show", f"configs/gpu/{recipe}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pools:" in proc.stdout and "role: trainer" in proc.stdout and "role: rollout" in proc.stdout
