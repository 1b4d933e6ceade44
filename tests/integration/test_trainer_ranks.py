"""Data-parallel trainer ranks (a trainer pool of count 2) as real Ray actors with real DeepSpeed (gloo) on a real
store: the two ranks share one global batch (each trains its own whole groups, none twice) and end the step with
the same weights as one trainer that trained the whole batch alone."""

from __future__ import annotations

import socket

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from asyncrl.config import load_config  # noqa: E402
from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.ranks import merge_step_results  # noqa: E402
from asyncrl.runtime import ray_session  # noqa: E402
from asyncrl.types import Streams  # noqa: E402
from storage import TrajectoryStore  # noqa: E402
from tests.conftest import first_server_only  # noqa: E402
from tests.integration.test_checkpoint_store import GROUP, _group  # noqa: E402

RANKS_POOLS = (
    "resources.pools=[{name: trainers, role: trainer, count: 2, cpus: 1}, {name: rollouts, role: rollout, cpus: 1}]"
)
TOLERANCE = 1e-6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@first_server_only
def test_two_ranks_split_the_batch_and_match_one_trainer(redis_url, tmp_path):
    from trainers.worker import TrainerWorker

    model = str(build_tiny_model(tmp_path / "model", seed=0))
    one = load_config("configs/tiny.yaml", ["run.name=ranks-one", "run.step_timeout_s=120"])
    two = load_config("configs/tiny.yaml", ["run.name=ranks-two", "run.step_timeout_s=120", RANKS_POOLS])
    assert (two.trainer_ranks, two.samples_per_rank, one.samples_per_rank) == (2, GROUP, 2 * GROUP)
    groups = [_group(index) for index in range(2)]  # one global batch: trainer.prompts_per_step = 2
    stores = [TrajectoryStore.from_config(redis_url, cfg.run.name, cfg.store) for cfg in (one, two)]
    worker = ray.remote(TrainerWorker).options(num_cpus=1)
    with ray_session(two):
        alone = worker.remote(one, model, redis_url)
        master = f"127.0.0.1:{_free_port()}"
        ranks = [worker.remote(two, model, redis_url, rank, master) for rank in range(2)]
        ray.get([actor.ready.remote() for actor in [alone, *ranks]], timeout=180)
        initial = ray.get(alone.weights.remote(), timeout=60)
        for store in stores:
            for group in groups:
                store.put(Streams.TRAJECTORIES, group)
        results = ray.get([actor.train_step.remote(0) for actor in [alone, *ranks]], timeout=240)
        merged = merge_step_results(results[1:])
        per_rank = [{row["prompt_id"] for row in result["ledger"]} for result in results[1:]]
        assert sorted(map(len, per_rank)) == [1, 1] and per_rank[0] != per_rank[1]  # a whole group each
        trained = sorted(row["sample_id"] for row in merged["ledger"])
        assert trained == sorted(row["sample_id"] for row in results[0]["ledger"]) and len(trained) == 2 * GROUP
        assert merged["samples"] == results[0]["samples"] and merged["tokens"] == results[0]["tokens"]
        weights = ray.get([actor.weights.remote() for actor in [alone, *ranks]], timeout=60)
    for name, tensor in weights[0].items():
        assert np.array_equal(weights[1][name], weights[2][name]), name  # the ranks stay identical
        assert np.allclose(weights[1][name], tensor, atol=TOLERANCE, rtol=0), name  # = one trainer, whole batch
    moved = max(float(np.abs(weights[0][name] - initial[name]).max()) for name in initial)
    assert moved > 100 * TOLERANCE  # the step changed the weights: the comparison above is not of the seed's
    for store in stores:
        store.purge()
        store.close()
