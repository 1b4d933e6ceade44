"""What the weight-sync tests check after a sync: engine samples as a trainer batch, and the largest gap between
the engine's behaviour log-probs and the trainer's on them."""

from __future__ import annotations

from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows
from trainers.batch import collate


def sampled_batch(sequences: list[dict]) -> dict:
    """The engine's sampled ``sequences`` (its ``sample`` call) as one collated group, behaviour log-probs kept."""
    rows = [
        {
            **{
                key: seq[key]
                for key in ("prompt_ids", "response_ids", "token_versions", "finish_reason", "gen_seconds")
            },
            "sample_id": seq["request_id"],
            "prompt_id": "p0",
            "group_id": "g0",
            "behavior_logprobs": seq["logprobs"],
            "version_start": min(seq["token_versions"]),
            "version_end": max(seq["token_versions"]),
            "reward": float(i % 2),
            "reward_failed": False,
            "worker_id": "w0",
        }
        for i, seq in enumerate(sequences)
    ]
    return collate(table_from_rows(rows, TRAJECTORY_SCHEMA), pad_id=0)


def logprob_gap(trainer, batch: dict) -> float:
    """Largest |trainer log-prob - engine log-prob| over the batch's response tokens."""
    mask = batch["response_mask"].bool()
    return (trainer.logprobs(batch)[mask] - batch["behavior_logprobs"][mask]).abs().max().item()
