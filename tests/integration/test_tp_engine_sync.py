"""A tensor-parallel vLLM engine (TP = 2 on CPU) updated from a per-rank sync plan: after each train step and
sync, its log-probs on its samples equal the trainer's within 1e-5 (float32).

In this process the buckets go through the plan as a transport delivers them (flatten on the sender, a copy,
unflatten on the receiver); the last test runs the engine in a process of its own behind a real gloo
broadcast link (the receiver and ``WeightReceiver.apply_to`` a rollout worker uses).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.sync.broadcast import host_rendezvous  # noqa: E402
from asyncrl.sync.local import EngineProcess, sample_sequences  # noqa: E402
from asyncrl.sync.plan import SyncPlan, module_tensors  # noqa: E402
from asyncrl.sync.sender import PoolSender  # noqa: E402
from asyncrl.sync.tp_layout import AttentionHeads  # noqa: E402
from asyncrl.sync.transport import SENDER_RANK, LinkSpec, build_transport  # noqa: E402
from tests.integration.sync_checks import logprob_gap, sampled_batch  # noqa: E402
from trainers.policy import PolicyTrainer  # noqa: E402

TOLERANCE = 1e-5
TP = 2
PROMPTS = [[5 + i, 17, 42, 7 * i + 3] for i in range(4)]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-tp") / "tiny"))


@pytest.fixture(scope="module")
def engine(model_dir):
    from rollout.engine import GenerationEngine

    # One OpenMP thread per TP worker: two workers on two cores, none oversubscribed.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        engine = GenerationEngine(model_dir, max_model_len=256, max_num_seqs=8, kv_cache_mb=32, tensor_parallel=TP)
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    yield engine
    engine.close()


def _deliver(plan: SyncPlan, tensors) -> list[tuple[str, torch.Tensor]]:
    """Every bucket packed by the sender and staged by a receiver (a fresh buffer, as a transport fills it)."""
    receiving = SyncPlan.from_dict(plan.to_dict())
    named = []
    for bucket in plan.buckets:
        staged = plan.flatten(bucket, tensors, plan.empty_bucket(bucket)).clone()
        named.extend(receiving.unflatten(receiving.buckets[bucket.index], staged))
    return named


def _tp_plan(trainer: PolicyTrainer) -> SyncPlan:
    tensors = module_tensors(trainer.engine.module)
    return SyncPlan.build(
        [(name, tuple(t.shape)) for name, t in tensors.items()],
        pool="tp",
        dtype="float32",
        bucket_mb=0.1,
        tensor_parallel=TP,
        heads=AttentionHeads.from_config(trainer.engine.module.config),
    )


def test_tp2_engine_logprobs_match_the_trainer_after_every_sync(model_dir, engine):
    trainer = PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=0)
    tensors = module_tensors(trainer.engine.module)
    plan = _tp_plan(trainer)
    whole = SyncPlan.build([(name, tuple(t.shape)) for name, t in tensors.items()], pool="tp", dtype="float32",
                           bucket_mb=0.1)  # fmt: skip
    assert all(plan.rank_nbytes(rank) < 0.75 * whole.nbytes for rank in range(TP))  # each rank gets its shards
    for version in (1, 2):
        batch = sampled_batch(sample_sequences(engine, PROMPTS, f"before-{version}", 12))
        trainer.forward_backward(batch)
        trainer.optimizer_step()
        assert logprob_gap(trainer, batch) > 1e-3  # the step changed the policy, so the check below can fail
        engine.update_weight_shards(plan.split_by_rank(_deliver(plan, module_tensors(trainer.engine.module))), version)
        after = sample_sequences(engine, PROMPTS, f"after-{version}", 12)
        assert all(seq["token_versions"] == [version] * len(seq["response_ids"]) for seq in after)
        assert logprob_gap(trainer, sampled_batch(after)) < TOLERANCE


def test_tp2_engine_loads_whole_tensors_through_vllms_reload(model_dir, engine):
    """The object-store sync hands every engine whole tensors: a TP engine's vLLM workers shard them themselves."""
    trainer = PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=1)
    batch = sampled_batch(sample_sequences(engine, PROMPTS, "whole-before", 12))
    trainer.forward_backward(batch)
    trainer.optimizer_step()
    assert logprob_gap(trainer, batch) > 1e-3
    engine.update_weights(list(module_tensors(trainer.engine.module).items()), 10)
    after = sample_sequences(engine, PROMPTS, "whole-after", 12)
    assert all(seq["token_versions"] == [10] * len(seq["response_ids"]) for seq in after)
    assert logprob_gap(trainer, sampled_batch(after)) < TOLERANCE


def test_tp2_engine_process_over_a_gloo_broadcast_matches_the_trainer(model_dir, engine):
    engine.close()  # the two TP engines' four workers would share the two cores
    trainer = PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=2)
    plan = _tp_plan(trainer)
    spec = LinkSpec(pool="tp", transport="broadcast", world_size=2, timeout_s=30.0, port=host_rendezvous(30.0).port)
    process = EngineProcess("tp", model_dir, tensor_parallel=TP)
    try:
        process.send_only("connect", plan.to_dict(), spec, 1)
        sender = PoolSender(plan, build_transport(spec, SENDER_RANK), spec.timeout_s)
        process.reply("connect", 40)
        batch = sampled_batch(process.call("sample", PROMPTS, "before", 12))
        trainer.forward_backward(batch)
        trainer.optimizer_step()
        assert logprob_gap(trainer, batch) > 1e-3
        process.send_only("sync", 1, "inflight")
        sender.send(module_tensors(trainer.engine.module), 1)
        process.reply("sync", 40)
        after = process.call("sample", PROMPTS, "after", 12)
        assert all(seq["token_versions"] == [1] * len(seq["response_ids"]) for seq in after)
        assert logprob_gap(trainer, sampled_batch(after)) < TOLERANCE
        sender.close()
    finally:
        process.close()
