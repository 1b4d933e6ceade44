"""The reward stage: scores the rollout workers' responses (``stages.reward``)."""

from __future__ import annotations

import pyarrow as pa

from asyncrl.config import Config
from asyncrl.rewards import build_scorer
from asyncrl.types import REWARD_COLUMNS, TRAJECTORY_SCHEMA


class RewardStage:
    """``table -> reward columns``: the run's reward (``reward.*``, its fault boundary included: a reward that
    raises or hangs marks that sample failed) over each row's prompt text, decoded response and answer."""

    columns = ("prompt_text", "answer", "response_ids")
    """The columns it reads."""
    adds = REWARD_COLUMNS

    def __init__(self, cfg: Config, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.scorer = build_scorer(cfg.reward)

    def __call__(self, table: pa.Table) -> pa.Table:
        responses = [
            self.tokenizer.decode(ids, skip_special_tokens=True) for ids in table.column("response_ids").to_pylist()
        ]
        answers = table.column("answer").to_pylist()
        scores = self.scorer.score_batch(
            table.column("prompt_text").to_pylist(), responses, [{"answer": answer} for answer in answers]
        )
        columns = {
            "reward": [s.reward for s in scores],
            "reward_failed": [s.failed for s in scores],
            "reward_error": [s.error for s in scores],
            "reward_components": [s.components for s in scores],
        }
        schema = pa.schema([TRAJECTORY_SCHEMA.field(name) for name in REWARD_COLUMNS])
        return pa.table(columns, schema=schema)
