"""A tensor-parallel vLLM engine (TP = 2 on CPU) updated from a per-rank sync plan: after each train step and
sync, its log-probs on its samples equal the trainer's within 1e-5 (float32).

The buckets go through the plan as a transport would deliver them (flatten on the sender, a copy, unflatten
on the receiver); the transports themselves are tested with TP = 1 in test_sync_transports.py.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.sync.plan import SyncPlan, module_tensors  # noqa: E402
from asyncrl.sync.tp_layout import AttentionHeads  # noqa: E402
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


def _sample(engine, tag: str, max_new_tokens: int) -> list[dict]:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"{tag}-{i:03d}", prompt, max_new_tokens=max_new_tokens, seed=i)
    finished = []
    while engine.num_unfinished():
        finished.extend(engine.step())
    return [
        {
            "request_id": seq.request_id,
            "prompt_ids": seq.prompt_ids,
            "response_ids": seq.response_ids,
            "logprobs": seq.logprobs,
            "token_versions": seq.token_versions,
            "finish_reason": seq.finish_reason,
            "gen_seconds": seq.gen_seconds,
        }
        for seq in sorted(finished, key=lambda seq: seq.request_id)
    ]


def _deliver(plan: SyncPlan, tensors) -> list[tuple[str, torch.Tensor]]:
    """Every bucket packed by the sender and staged by a receiver (a fresh buffer, as a transport fills it)."""
    receiving = SyncPlan.from_dict(plan.to_dict())
    named = []
    for bucket in plan.buckets:
        staged = plan.flatten(bucket, tensors, plan.empty_bucket(bucket)).clone()
        named.extend(receiving.unflatten(receiving.buckets[bucket.index], staged))
    return named


def test_tp2_engine_logprobs_match_the_trainer_after_every_sync(model_dir, engine):
    trainer = PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=0)
    tensors = module_tensors(trainer.engine.module)
    heads = AttentionHeads.from_config(trainer.engine.module.config)
    plan = SyncPlan.build(
        [(name, tuple(t.shape)) for name, t in tensors.items()],
        pool="tp",
        dtype="float32",
        bucket_mb=0.1,
        tensor_parallel=TP,
        heads=heads,
    )
    whole = SyncPlan.build([(name, tuple(t.shape)) for name, t in tensors.items()], pool="tp", dtype="float32",
                           bucket_mb=0.1)  # fmt: skip
    assert all(plan.rank_nbytes(rank) < 0.75 * whole.nbytes for rank in range(TP))  # each rank gets its shards
    for version in (1, 2):
        batch = sampled_batch(_sample(engine, f"before-{version}", 12))
        trainer.forward_backward(batch)
        trainer.optimizer_step()
        assert logprob_gap(trainer, batch) > 1e-3  # the step changed the policy, so the check below can fail
        engine.update_weight_shards(plan.split_by_rank(_deliver(plan, module_tensors(trainer.engine.module))), version)
        after = _sample(engine, f"after-{version}", 12)
        assert all(seq["token_versions"] == [version] * len(seq["response_ids"]) for seq in after)
        assert logprob_gap(trainer, sampled_batch(after)) < TOLERANCE


def test_tp2_engine_loads_whole_tensors_through_vllms_reload(model_dir, engine):
    """The object-store sync hands every engine whole tensors: a TP engine's vLLM workers shard them themselves."""
    trainer = PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=1)
    batch = sampled_batch(_sample(engine, "whole-before", 12))
    trainer.forward_backward(batch)
    trainer.optimizer_step()
    assert logprob_gap(trainer, batch) > 1e-3
    engine.update_weights(list(module_tensors(trainer.engine.module).items()), 10)
    after = _sample(engine, "whole-after", 12)
    assert all(seq["token_versions"] == [10] * len(seq["response_ids"]) for seq in after)
    assert logprob_gap(trainer, sampled_batch(after)) < TOLERANCE
