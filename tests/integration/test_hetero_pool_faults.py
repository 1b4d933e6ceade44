"""The controller's per-pool sync (``asyncrl.weight_sync.BucketedSync``) over real Ray actors: a trainer worker
and two rollout workers, one per pool (``fp32`` over the gloo broadcast, ``bf16`` through the store).

The bf16 pool's only engine is stopped (SIGSTOP) before a sync: the sync raises ``EnginesHung`` naming that pool
and engine within ``sync.timeout_s`` plus the Ray margin, while the fp32 pool gets the version; the next sync goes
on without the empty pool; once the stopped engine is killed and Ray restarted it, ``rejoin`` puts it back into
its own pool's link, and the sync after that reaches both pools again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

from asyncrl.config import load_config  # noqa: E402
from asyncrl.controller import _launch_workers  # noqa: E402
from asyncrl.models import resolve_model_path  # noqa: E402
from asyncrl.runtime import ray_session  # noqa: E402
from asyncrl.weight_sync import CONNECT_MARGIN_S, BucketedSync, EnginesHung, build_weight_sync  # noqa: E402

HANG_S = 4.0
POOLS = (
    "resources.pools=[{name: trainers, role: trainer, cpus: 1}, {name: fp32, role: rollout, cpus: 1}, "
    "{name: bf16, role: rollout, cpus: 1, dtype: bfloat16, sync_transport: store, sync_bucket_mb: 0.1}]"
)


def test_a_stopped_engine_fails_only_its_pools_sync_and_rejoins_its_pools_link(tmp_path, one_redis):
    redis_url = one_redis
    cfg = load_config(
        "configs/tiny.yaml",
        [f"run.name=faults-{uuid.uuid4().hex[:6]}", f"run.dir={tmp_path / 'run'}", f"store.url={redis_url}",
         "sync.transport=broadcast", "sync.bucket_mb=0.25", f"sync.timeout_s={HANG_S:g}", POOLS],
    )  # fmt: skip
    model_path = str(resolve_model_path(cfg.model.path))
    stopped = None
    with ray_session(cfg):
        (trainer,), rollouts = _launch_workers(cfg, model_path, redis_url)  # one trainer rank
        sync = build_weight_sync(cfg, trainer, rollouts, redis_url)
        assert isinstance(sync, BucketedSync)
        assert [(link.name, link.engines) for link in sync.links] == [("fp32", [0]), ("bf16", [1])]
        try:
            sync.sync(1)  # both pools
            stopped = ray.get(rollouts[1].memory.remote(), timeout=30)["pid"]
            os.kill(stopped, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(EnginesHung) as info:
                sync.sync(2)
            assert time.monotonic() - started < HANG_S + CONNECT_MARGIN_S + 10
            assert info.value.engines == [1]
            assert "pool bf16: sync to version 2 timed out: engine rollout-1" in str(info.value)
            assert "pool fp32" not in str(info.value)  # the fp32 pool got version 2
            assert [link.live for link in sync.links] == [[0], []]

            sync.sync(3)  # the empty pool is not sent to: no wait on the stopped engine
            ray.kill(rollouts[1], no_restart=False)  # as the supervisor does with a hung worker
            os.kill(stopped, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:  # Ray restarts the actor in a new process
                try:
                    pid = ray.get(rollouts[1].memory.remote(), timeout=10)["pid"]
                    if pid != stopped:
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                assert time.monotonic() < deadline, "the stopped rollout worker was not restarted"
                time.sleep(0.5)
            sync.rejoin(1)
            sync.sync(4)  # its pool's link is rebuilt with it (a new generation) and both pools get version 4
            assert [(link.live, link.generation) for link in sync.links] == [([0], 0), ([1], 1)]
        finally:
            if stopped is not None:
                try:
                    os.kill(stopped, signal.SIGKILL)
                except ProcessLookupError:
                    pass
