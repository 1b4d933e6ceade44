"""After a real DeepSpeed step and a weight sync, the vLLM engine samples from the trainer's policy:
engine behaviour log-probs equal the trainer's log-probs of the same tokens within 1e-4."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows  # noqa: E402
from rollout.engine import GenerationEngine  # noqa: E402
from trainers.batch import collate  # noqa: E402
from trainers.policy import PolicyTrainer  # noqa: E402

TOLERANCE = 1e-4


def _sample(engine: GenerationEngine, prompts: list[list[int]], tag: str) -> list:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, max_new_tokens=12, seed=i)
    finished = []
    while engine.num_unfinished():
        finished.extend(engine.step())
    return sorted(finished, key=lambda seq: seq.request_id)


def _table(sequences: list, rewards: list[float]):
    rows = [
        {
            "sample_id": seq.request_id,
            "prompt_id": "p0",
            "group_id": "g0",
            "prompt_ids": seq.prompt_ids,
            "response_ids": seq.response_ids,
            "behavior_logprobs": seq.logprobs,
            "token_versions": seq.token_versions,
            "version_start": min(seq.token_versions),
            "version_end": max(seq.token_versions),
            "reward": reward,
            "reward_failed": False,
            "finish_reason": seq.finish_reason,
            "worker_id": "w0",
            "gen_seconds": seq.gen_seconds,
        }
        for seq, reward in zip(sequences, rewards, strict=True)
    ]
    return table_from_rows(rows, TRAJECTORY_SCHEMA)


def _max_gap(trainer: PolicyTrainer, sequences: list, batch: dict) -> float:
    trainer_logprobs = trainer.logprobs(batch)
    mask = batch["response_mask"].bool()
    return (trainer_logprobs[mask] - batch["behavior_logprobs"][mask]).abs().max().item()


def test_engine_matches_trainer_after_a_step_and_sync(tmp_path):
    model_dir = str(build_tiny_model(tmp_path / "tiny"))
    engine = GenerationEngine(model_dir, max_model_len=128, max_num_seqs=8, kv_cache_mb=16)
    trainer = PolicyTrainer(model_dir, lr=5e-3, micro_batch_size=4, grad_accum_steps=1, seed=0)
    prompts = [[5 + i, 17, 42, 7 * i + 3] for i in range(4)]

    before = _sample(engine, prompts, "v0")
    batch0 = collate(_table(before, [1.0, 0.0, 1.0, 0.0]), pad_id=0)
    assert _max_gap(trainer, before, batch0) < TOLERANCE  # same weights on both sides

    trainer.forward_backward(batch0)
    trainer.optimizer_step()
    stale_gap = _max_gap(trainer, before, batch0)
    assert stale_gap > 1e-3  # the step really changed the policy, so the check below can fail

    engine.update_weights(trainer.named_weights(), version=1)
    after = _sample(engine, prompts, "v1")
    assert all(seq.token_versions == [1] * len(seq.response_ids) for seq in after)
    batch1 = collate(_table(after, [0.0] * 4), pad_id=0)
    assert _max_gap(trainer, after, batch1) < TOLERANCE
    engine.close()
