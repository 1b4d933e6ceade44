"""Bucketed weight sync between processes: a DeepSpeed trainer here, engines in child processes.

- After every sync through the broadcast (gloo) and the store transport, the engine's behaviour
  log-probs equal the trainer's log-probs of the same tokens within 1e-5 (fp32, TP 1).
- Two pools of different dtype and transport (fp32 over gloo, bf16 through the store) from one sender.
- An engine killed mid-sync: the sender fails with an error naming pool and bucket well within
  ``timeout_s``, a decoding engine keeps decoding, and the rebuilt group syncs the survivors.
- An engine stopped (SIGSTOP) mid-sync: the engine gloo forwards through it fails naming pool, engine
  and bucket within ``timeout_s``, the decoding engine carries on, and the rebuilt group syncs the rest.
- The shm transport: log-probs after every sync equal the trainer's; an engine killed or stopped
  mid-sync fails the trainer's send within ``timeout_s`` naming pool, engine and bucket, the others'
  waits fail the same way, the decoding engine carries on and a new generation syncs the rest.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.sync.broadcast import host_rendezvous  # noqa: E402
from asyncrl.sync.local import EngineProcess, EngineProcessError  # noqa: E402
from asyncrl.sync.plan import SyncPlan, module_tensors  # noqa: E402
from asyncrl.sync.sender import PoolSender, send_to_pools  # noqa: E402
from asyncrl.sync.transport import SENDER_RANK, LinkSpec, SyncError, build_transport  # noqa: E402
from tests.conftest import first_server_only  # noqa: E402
from tests.integration.sync_checks import logprob_gap, sampled_batch  # noqa: E402
from trainers.policy import PolicyTrainer  # noqa: E402

TOLERANCE = 1e-5
TIMEOUT_S = 20.0
SLACK_S = 5.0  # a failure is reported within TIMEOUT_S plus this
BUCKET_MB = 0.25  # the tiny model (~0.4 MB) spans several buckets, so bucket boundaries are exercised
PROMPTS = [[5 + i, 17, 42, 7 * i + 3] for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny"))


@pytest.fixture(scope="module")
def trainer(model_dir) -> PolicyTrainer:
    return PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    process = EngineProcess("e0", model_dir)
    yield process
    process.close()


def _plan(trainer: PolicyTrainer, pool: str, dtype: str = "float32") -> SyncPlan:
    shapes = [(name, tuple(t.shape)) for name, t in module_tensors(trainer.engine.module).items()]
    return SyncPlan.build(shapes, pool=pool, dtype=dtype, bucket_mb=BUCKET_MB)


def _spec(pool: str, transport: str, engines: int, redis_url: str = "", generation: int = 0) -> LinkSpec:
    return LinkSpec(
        pool=pool,
        transport=transport,
        world_size=1 + engines,
        timeout_s=TIMEOUT_S,
        generation=generation,
        port=host_rendezvous(TIMEOUT_S).port,
        store_url=redis_url,
        run_id=f"sync-{uuid.uuid4().hex[:8]}",
    )


def _connect(plan: SyncPlan, spec: LinkSpec, engines: list[EngineProcess]) -> PoolSender:
    """Both ends join at once (joining the broadcast group is collective)."""
    for rank, process in enumerate(engines, 1):
        process.send_only("connect", plan.to_dict(), spec, rank)
    sender = PoolSender(plan, build_transport(spec, SENDER_RANK), spec.timeout_s)
    for process in engines:
        process.reply("connect", TIMEOUT_S + 10)
    return sender


def test_engine_logprobs_match_the_trainer_after_every_gloo_broadcast(trainer, engine):
    _check_parity(trainer, engine, "broadcast", "")


@first_server_only
def test_engine_logprobs_match_the_trainer_after_every_store_sync(trainer, engine, redis_url):
    _check_parity(trainer, engine, "store", redis_url)


def test_engine_logprobs_match_the_trainer_after_every_shm_sync(trainer, engine):
    _check_parity(trainer, engine, "shm", "")


def _check_parity(trainer: PolicyTrainer, engine: EngineProcess, transport: str, redis_url: str) -> None:
    """Two train steps, each followed by a sync; after each, fresh samples match the trainer."""
    plan = _plan(trainer, f"pool-{transport}")
    assert len(plan.buckets) > 1
    sender = _connect(plan, _spec(plan.pool, transport, 1, redis_url), [engine])
    version = engine.call("sample", PROMPTS, "probe", 1)[0]["token_versions"][0]
    for _ in range(2):
        before = engine.call("sample", PROMPTS, f"v{version}", 12)
        batch = sampled_batch(before)
        trainer.forward_backward(batch)
        trainer.optimizer_step()
        assert logprob_gap(trainer, batch) > 1e-3  # the step changed the policy, so the check below can fail
        version += 1
        engine.send_only("sync", version, "inflight")
        sender.send(module_tensors(trainer.engine.module), version)
        engine.reply("sync", TIMEOUT_S + 10)
        after = engine.call("sample", PROMPTS, f"v{version}", 12)
        assert all(seq["token_versions"] == [version] * len(seq["response_ids"]) for seq in after)
        assert logprob_gap(trainer, sampled_batch(after)) < TOLERANCE
    sender.close()


@first_server_only
def test_two_pools_of_different_dtype_and_transport_from_one_sender(trainer, redis_url):
    fp32_plan, bf16_plan = _plan(trainer, "fp32-gloo", "float32"), _plan(trainer, "bf16-store", "bfloat16")
    receivers = {pool: EngineProcess(pool, None) for pool in ("fp32-gloo", "bf16-store")}
    try:
        senders = {
            "fp32-gloo": _connect(fp32_plan, _spec("fp32-gloo", "broadcast", 1), [receivers["fp32-gloo"]]),
            "bf16-store": _connect(bf16_plan, _spec("bf16-store", "store", 1, redis_url), [receivers["bf16-store"]]),
        }
        tensors = module_tensors(trainer.engine.module)
        for process in receivers.values():
            process.send_only("sync", 7, "inflight")
        stats = send_to_pools(senders, tensors, 7)
        for process in receivers.values():
            process.reply("sync", TIMEOUT_S + 10)
        assert stats["bf16-store"].bytes * 2 == stats["fp32-gloo"].bytes
        for pool, dtype in (("fp32-gloo", torch.float32), ("bf16-store", torch.bfloat16)):
            staged = receivers[pool].call("staged")
            assert set(staged) == set(tensors)
            for name, tensor in tensors.items():
                assert staged[name].dtype == dtype
                assert torch.equal(staged[name], tensor.to(dtype)), (pool, name)
        for sender in senders.values():
            sender.close()
    finally:
        for process in receivers.values():
            process.close()


def test_an_engine_killed_mid_sync_fails_the_sync_fast_and_the_others_carry_on(trainer, engine):
    plan = _plan(trainer, "faulty")
    doomed = EngineProcess("doomed", None, die_after_bucket=0)
    bare = EngineProcess("bare", None)
    try:
        engines = [engine, doomed, bare]
        sender = _connect(plan, _spec("faulty", "broadcast", 3), engines)
        engine.call("start_load", 4, 32)
        tensors = module_tensors(trainer.engine.module)
        for process in (engine, bare):
            process.send_only("sync", 100, "inflight")
        started = time.monotonic()
        with pytest.raises(SyncError, match=r"pool faulty: trainer failed on bucket \d+ of version 100"):
            sender.send(tensors, 100)
        # gloo notices the dead peer on the next bucket's send or at the collective's timeout, not before.
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        survivors_failed = 0
        for process in (engine, bare):
            try:  # a survivor either got every bucket before the root failed, or times out waiting
                process.reply("sync", TIMEOUT_S + 10)
            except EngineProcessError as err:
                assert "pool faulty" in str(err) and "bucket" in str(err)
                survivors_failed += 1
        steps = engine.call("stop_load")
        # The decoding engine kept stepping through the failed sync, on its old weights.
        assert sum(1 for stamp, *_ in steps if stamp > started) > 5
        assert all(version != 100 for *_, version in steps)
        sender.close()

        # The group is rebuilt over the survivors (a new generation) and syncs them.
        survivors = [engine, bare]
        sender = _connect(plan, _spec("faulty", "broadcast", 2, generation=1), survivors)
        for process in survivors:
            process.send_only("sync", 101, "pause")
        sender.send(tensors, 101)
        for process in survivors:
            process.reply("sync", TIMEOUT_S + 10)
        assert engine.call("sample", PROMPTS[:1], "after-rebuild", 4)[0]["token_versions"] == [101] * 4
        sender.close()
    finally:
        doomed.close()
        bare.close()


def test_an_engine_stopped_mid_sync_fails_the_sync_within_the_timeout_and_the_others_carry_on(trainer, engine):
    plan = _plan(trainer, "stalled")
    stopped, bare = EngineProcess("stopped", None), EngineProcess("bare-2", None)
    try:
        # gloo broadcasts along a binomial tree: of 4 ranks, rank 1 forwards each bucket to rank 3 (bare).
        sender = _connect(plan, _spec("stalled", "broadcast", 3), [stopped, engine, bare])
        engine.call("start_load", 4, 32)
        tensors = module_tensors(trainer.engine.module)
        os.kill(stopped.process.pid, signal.SIGSTOP)  # alive, silent: a hung engine
        for process in (engine, bare):
            process.send_only("sync", 100, "inflight")
        started = time.monotonic()
        try:  # the root's sends to the stopped rank may still land in its socket buffers
            sender.send(tensors, 100)
        except SyncError as err:
            assert re.search(r"pool stalled: trainer failed on bucket \d+ of version 100", str(err)), err
        with pytest.raises(EngineProcessError, match=r"pool stalled: engine 2 failed on bucket \d+ of version 100"):
            bare.reply("sync", TIMEOUT_S + SLACK_S)
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        try:  # fed by the root itself: it got every bucket unless the root gave up first
            engine.reply("sync", TIMEOUT_S + SLACK_S)
        except EngineProcessError as err:
            assert "pool stalled" in str(err) and "bucket" in str(err)
        steps = engine.call("stop_load")
        assert sum(1 for stamp, *_ in steps if stamp > started) > 5  # it kept decoding through the failed sync
        sender.close()

        survivors = [engine, bare]  # the group is rebuilt without the stopped rank and syncs them
        sender = _connect(plan, _spec("stalled", "broadcast", 2, generation=1), survivors)
        for process in survivors:
            process.send_only("sync", 101, "pause")
        sender.send(tensors, 101)
        for process in survivors:
            process.reply("sync", TIMEOUT_S + 10)
        assert engine.call("sample", PROMPTS[:1], "after-stall", 4)[0]["token_versions"] == [101] * 4
        sender.close()
    finally:
        stopped.process.kill()  # SIGKILL ends a stopped process too
        stopped.process.join(timeout=30)
        bare.close()


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_an_engine_lost_mid_shm_sync_fails_it_within_the_timeout_naming_the_engine(trainer, engine, fault):
    plan = _plan(trainer, f"shm-{fault}")
    lost = EngineProcess(f"lost-{fault}", None, die_after_bucket=0 if fault == "killed" else None)
    bare = EngineProcess(f"bare-{fault}", None)
    try:
        sender = _connect(plan, _spec(plan.pool, "shm", 3), [engine, lost, bare])
        engine.call("start_load", 4, 32)
        tensors = module_tensors(trainer.engine.module)
        if fault == "stopped":
            os.kill(lost.process.pid, signal.SIGSTOP)  # alive, silent: a hung engine
        else:
            lost.send_only("sync", 100, "inflight")
        for process in (engine, bare):
            process.send_only("sync", 100, "inflight")
        started = time.monotonic()
        bucket = 1 if fault == "killed" else 0  # the killed one staged bucket 0 before it died
        with pytest.raises(SyncError, match=rf"pool {plan.pool}: trainer failed on bucket {bucket} of version 100: "
                           rf"engine 1 did not ask for it within {TIMEOUT_S}s"):  # fmt: skip
            sender.send(tensors, 100)
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        for index, process in ((0, engine), (2, bare)):  # each waited for a bucket the trainer never wrote
            with pytest.raises(EngineProcessError, match=rf"pool {plan.pool}: engine {index} failed on bucket "):
                process.reply("sync", TIMEOUT_S + SLACK_S)
        steps = engine.call("stop_load")
        assert sum(1 for stamp, *_ in steps if stamp > started) > 5  # it kept decoding through the failed sync
        assert all(version != 100 for *_, version in steps)
        sender.close()

        survivors = [engine, bare]  # a new generation without the lost engine syncs the others
        sender = _connect(plan, _spec(plan.pool, "shm", 2, generation=1), survivors)
        for process in survivors:
            process.send_only("sync", 101, "inflight")
        sender.send(tensors, 101)
        for process in survivors:
            process.reply("sync", TIMEOUT_S + 10)
        assert engine.call("sample", PROMPTS[:1], f"after-{fault}", 4)[0]["token_versions"] == [101] * 4
        sender.close()
    finally:
        lost.process.kill()  # SIGKILL ends a stopped process too
        lost.process.join(timeout=30)
        bare.close()
