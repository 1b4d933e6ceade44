"""The Arrow data contract between stages (DESIGN §3).

Every stage moves record batches of these schemas through the store. A prompt row is one
prompt to sample ``group_size`` responses for; a trajectory row is one sampled response.
"""

from __future__ import annotations

import pyarrow as pa

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string()),
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("prompt_text", pa.string()),
        pa.field("answer", pa.string()),
    ]
)

TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("group_id", pa.string()),
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("response_ids", pa.list_(pa.int32())),
        pa.field("behavior_logprobs", pa.list_(pa.float32())),
        pa.field("token_versions", pa.list_(pa.int32())),
        pa.field("version_start", pa.int32()),
        pa.field("version_end", pa.int32()),
        pa.field("reward", pa.float32()),
        pa.field("reward_failed", pa.bool_()),
        # Why the reward failed: the exception's type name (TimeoutError, NonFiniteReward, ...); null when it did not.
        pa.field("reward_error", pa.string()),
        # Named parts of the reward (asyncrl.rewards.interface); empty for a plain float reward, null from older writers.
        pa.field("reward_components", pa.map_(pa.string(), pa.float32())),
        pa.field("finish_reason", pa.string()),
        pa.field("worker_id", pa.string()),
        pa.field("gen_seconds", pa.float32()),
        # Per response token, 1 where the policy sampled it (trained) and 0 where an environment appended it
        # (a multi-turn observation: context only, its behavior_logprobs are 0.0 placeholders); null is all 1.
        pa.field("loss_mask", pa.list_(pa.int8())),
    ]
)


REWARD_COLUMNS = ("reward", "reward_failed", "reward_error", "reward_components")
"""The columns a reward writes; with ``stages.reward`` the reward stage adds them to the rollout workers' rows."""

SCORING_INPUTS = pa.schema([pa.field("prompt_text", pa.string()), pa.field("answer", pa.string())])
"""Columns a rollout worker adds to its rows for the reward stage (``stages.reward``): what a reward is called with."""

GENERATED_SCHEMA = pa.schema(
    [field for field in TRAJECTORY_SCHEMA if field.name not in REWARD_COLUMNS] + list(SCORING_INPUTS)
)
"""A rollout worker's rows with ``stages.reward``: trajectories before scoring, with what scoring needs."""


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table of ``schema`` from row dicts (columns missing from a row are an error)."""
    return pa.Table.from_pylist(rows, schema=schema)


class Streams:
    """Store streams of a run and the consumer group that reads each (DESIGN §4)."""

    PROMPTS = "prompts"  # controller -> rollout workers (PROMPT_SCHEMA), group "rollout"
    # rollout workers -> the pipeline stages (stages.*: groups "reward" and "reference", which add their columns
    # and hand each entry on to TRAJECTORIES once all of them are there); unused without stages
    GENERATED = "generated"
    TRAJECTORIES = "trajectories"  # rollout workers or the stages -> trainer (TRAJECTORY_SCHEMA), group "trainer"
    DROPPED = "dropped"  # trainer -> controller: prompt ids of groups dropped as stale, group "controller"


class Groups:
    ROLLOUT = "rollout"
    TRAINER = "trainer"
    CONTROLLER = "controller"
    REWARD = "reward"
    REFERENCE = "reference"
