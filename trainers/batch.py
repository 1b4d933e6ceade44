"""Trajectory rows (Arrow, ``TRAJECTORY_SCHEMA``) to advantages and the padded tensors one micro-batch needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from asyncrl.algorithms.group_filter import group_keep_mask
from asyncrl.algorithms.overlong import overlong_penalty
from asyncrl.algorithms.registry import BATCH_SCOPED_ADVANTAGES, get_advantage


@dataclass(frozen=True, kw_only=True, slots=True)
class Scoring:
    """How rewards become advantages; ``trainers.worker.build_scoring`` makes it from the config."""

    advantage: str = "grpo"
    """Estimator name in ``asyncrl.algorithms.registry.ADVANTAGES``."""
    max_response_len: int = 0
    """``rollout.max_new_tokens``, the length the overlong penalty counts towards."""
    overlong_buffer: int = 0
    """Tokens before ``max_response_len`` over which the overlong penalty grows; 0 is off."""
    overlong_penalty: float = 1.0
    """The penalty at ``max_response_len`` tokens."""
    filter_equal_groups: bool = False
    """``GroupScorer`` drops groups whose rewards are all equal."""


def collate(table: pa.Table, pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``prompt_ids + response_ids`` of every row into one batch.

    Returns, with ``B`` rows and ``L`` the longest prompt plus response:

    - ``input_ids`` ``[B, L]`` int64, ``pad_id`` after each sequence;
    - ``attention_mask`` ``[B, L]`` int64, 1 on real tokens;
    - ``response_mask`` ``[B, L]`` float32, 1 on the response tokens that are trained: every response token,
      or where the row has a ``loss_mask`` those it marks 1 (a multi-turn observation is 0: context only);
    - ``behavior_logprobs`` ``[B, L]`` float32, each response token's sampling log-prob at that
      token's position (the alignment of ``asyncrl.algorithms.sequence_logprobs``), 0 elsewhere;
    - ``advantages`` ``[B]`` float32: the table's ``advantages`` column when it has one (see
      ``with_advantages``), else GRPO advantages over these rows' ``group_id`` and ``reward``;
    - ``ref_logprobs`` ``[B, L]`` float32, aligned as ``behavior_logprobs``, only when the table
      has that column (the loss then adds the KL to the reference); the reference stage writes it
      (``stages.reference``).

    Without an ``advantages`` column a group's statistics come from the rows of this table only,
    so the rows of a group must arrive together; a trainer that splits groups across
    micro-batches runs ``with_advantages`` on each whole group first.
    """
    if table.num_rows == 0:
        raise ValueError("collate needs at least one trajectory row")
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    behavior = table.column("behavior_logprobs").to_pylist()
    reference = table.column("ref_logprobs").to_pylist() if "ref_logprobs" in table.schema.names else None
    loss_masks = table.column("loss_mask").to_pylist() if "loss_mask" in table.schema.names else [None] * len(prompts)
    sample_ids = table.column("sample_id").to_pylist()
    max_len = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    # The rows are padded as Python lists and each field becomes a tensor in one call: a micro-batch is a few
    # short rows, so per-row tensor writes cost more (a dispatch each) than the lists.
    input_ids, attention_mask, response_mask, behavior_logprobs, ref_logprobs = [], [], [], [], []
    for row, (prompt, response, logprobs) in enumerate(zip(prompts, responses, behavior, strict=True)):
        _check_per_token(sample_ids[row], "behavior_logprobs", logprobs, response)
        end = len(prompt) + len(response)
        before, after = [0.0] * len(prompt), [0.0] * (max_len - end)
        input_ids.append(prompt + response + [pad_id] * (max_len - end))
        attention_mask.append([1] * end + [0] * (max_len - end))
        if loss_masks[row] is None:
            response_mask.append(before + [1.0] * len(response) + after)
        else:
            _check_per_token(sample_ids[row], "loss_mask entries", loss_masks[row], response)
            response_mask.append(before + loss_masks[row] + after)
        behavior_logprobs.append(before + logprobs + after)
        if reference is not None:
            _check_per_token(sample_ids[row], "ref_logprobs", reference[row], response)
            ref_logprobs.append(before + reference[row] + after)

    batch = {
        "input_ids": _tensor(input_ids, np.int64),
        "attention_mask": _tensor(attention_mask, np.int64),
        "response_mask": _tensor(response_mask, np.float32),
        "behavior_logprobs": _tensor(behavior_logprobs, np.float32),
        "advantages": _column_or_grpo_advantages(table),
    }
    if reference is not None:
        batch["ref_logprobs"] = _tensor(ref_logprobs, np.float32)
    return batch


def _tensor(rows: list[list], dtype: type) -> Tensor:
    # Through numpy: torch.tensor on nested lists converts element by element, several times slower.
    return torch.from_numpy(np.array(rows, dtype=dtype))


def _check_per_token(sample_id: str, name: str, values: list, response: list[int]) -> None:
    if len(values) != len(response):
        raise ValueError(f"trajectory {sample_id!r}: {len(values)} {name} for {len(response)} response tokens")


def mask_summary(loss_mask: list[int] | None) -> dict[str, int]:
    """A multi-turn row's ``turns`` (runs of sampled tokens), ``trained_tokens`` and ``observation_tokens`` (the
    masked ones) for the ledger; empty for a single-turn row (no ``loss_mask``)."""
    if loss_mask is None:
        return {}
    turns = sum(1 for i, bit in enumerate(loss_mask) if bit and (i == 0 or not loss_mask[i - 1]))
    return {"turns": turns, "trained_tokens": loss_mask.count(1), "observation_tokens": loss_mask.count(0)}


def with_advantages(table: pa.Table, scoring: Scoring | None = None) -> pa.Table:
    """``table`` plus a float32 ``advantages`` column (one per row, replacing any old one).

    The estimator ``scoring.advantage`` (default GRPO) over the rows' ``group_id`` and ``reward``,
    so pass whole groups (every group of the step for a batch-scoped estimator, see
    ``GroupScorer``). With an overlong buffer, each reward first gets DAPO's length penalty
    (``overlong_penalty`` of the response's token count); the ``reward`` column keeps the task
    reward, so the ledger and the logged reward stay the task's. A row with
    ``reward_failed`` (or a null reward) is left out of the statistics and gets advantage 0:
    it still passes through the model but moves no weight.
    """
    values = pa.array(_advantages(table, scoring or Scoring()).tolist(), type=pa.float32())
    if "advantages" in table.schema.names:
        return table.set_column(table.schema.get_field_index("advantages"), "advantages", values)
    return table.append_column("advantages", values)


def split_groups(table: pa.Table) -> list[pa.Table]:
    """The groups of ``table`` (rows sharing a ``group_id``), in order of first appearance."""
    group_ids = table.column("group_id").to_pylist()
    if len(set(group_ids)) <= 1:
        return [table]
    order = list(dict.fromkeys(group_ids))
    return [table.filter(pc.equal(table.column("group_id"), group_id)) for group_id in order]


def varied_groups(table: pa.Table) -> pa.Table:
    """The rows of the groups whose valid rewards are not all equal (DAPO's dynamic-sampling filter).

    A group with fewer than two valid rewards has no spread either and is dropped; a failed row
    of a kept group stays (with advantage 0). The filter looks at the task reward, before any
    overlong penalty: a group that is all right or all wrong is dropped whatever its lengths.
    """
    valid, rewards, groups = _valid_rewards(table)
    kept_groups = set(groups[valid][group_keep_mask(rewards, groups[valid])].tolist())
    keep = [int(code) in kept_groups for code in groups.tolist()]
    return table.filter(pa.array(keep, type=pa.bool_()))


class GroupScorer:
    """Turns one optimizer step's incoming groups into tables with an ``advantages`` column.

    Consumes whole groups (one store entry each) through ``accept``; ``ready`` hands back the
    scored tables that may be trained now. A group-scoped estimator scores each group as it
    arrives, so training overlaps the wait for the rest of the batch. A batch-scoped one
    (REINFORCE++) needs the whole batch's statistics: it holds every group until
    ``samples_per_step`` rows are in, then scores them together.
    """

    def __init__(self, scoring: Scoring, samples_per_step: int) -> None:
        self.scoring = scoring
        self.samples_per_step = samples_per_step
        self._batch_scoped = scoring.advantage in BATCH_SCOPED_ADVANTAGES
        self._held: list[pa.Table] = []

    def accept(self, group: pa.Table) -> bool:
        """Hold ``group`` for scoring; False, holding nothing, when the equal-reward filter drops it."""
        if self.scoring.filter_equal_groups:
            group = varied_groups(group)
            if group.num_rows == 0:
                return False
        self._held.append(group)
        return True

    def ready(self) -> list[pa.Table]:
        """The held groups, scored, as soon as their estimator may score them (then no longer held)."""
        held_rows = sum(table.num_rows for table in self._held)
        if not self._held or (self._batch_scoped and held_rows < self.samples_per_step):
            return []
        held, self._held = self._held, []
        # A group-scoped estimator gives each group of the concatenation what it gives the group alone: one call
        # for every group held (a dozen small tensor ops each, whatever the rows) instead of one per group.
        return [with_advantages(pa.concat_tables(held), self.scoring)]


def _column_or_grpo_advantages(table: pa.Table) -> Tensor:
    if "advantages" not in table.schema.names:
        return _advantages(table, Scoring())
    column = table.column("advantages")
    if not pa.types.is_floating(column.type):
        raise ValueError(f"the advantages column must hold one float per row, got {column.type}")
    values = column.to_pylist()
    if any(value is None for value in values):
        raise ValueError("the advantages column has nulls; run with_advantages on whole groups first")
    return torch.tensor(values, dtype=torch.float32)


def _valid_rewards(table: pa.Table) -> tuple[Tensor, Tensor, Tensor]:
    """``valid`` ``[B]`` bool (a reward that did not fail), those rows' rewards, and every row's group code."""
    rewards = table.column("reward").to_pylist()
    failed = (
        table.column("reward_failed").to_pylist() if "reward_failed" in table.schema.names else [False] * len(rewards)
    )
    valid = [reward is not None and not bad for reward, bad in zip(rewards, failed, strict=True)]
    group_codes = table.column("group_id").combine_chunks().dictionary_encode().indices.to_pylist()
    kept_rewards = torch.tensor([r for r, ok in zip(rewards, valid, strict=True) if ok], dtype=torch.float32)
    return torch.tensor(valid, dtype=torch.bool), kept_rewards, torch.tensor(group_codes, dtype=torch.int64)


def _advantages(table: pa.Table, scoring: Scoring) -> Tensor:
    valid, rewards, groups = _valid_rewards(table)
    every = bool(valid.all())  # the common case: no failed reward, no mask to scatter through
    if not every and not valid.any():
        return torch.zeros(table.num_rows, dtype=torch.float32)
    if scoring.overlong_buffer > 0:
        lengths = torch.tensor(pc.list_value_length(table.column("response_ids")).to_pylist())
        rewards = rewards + overlong_penalty(
            lengths if every else lengths[valid],
            scoring.max_response_len,
            scoring.overlong_buffer,
            scoring.overlong_penalty,
        )
    scored = get_advantage(scoring.advantage)(rewards, groups if every else groups[valid]).to(torch.float32)
    if every:
        return scored
    advantages = torch.zeros(table.num_rows, dtype=torch.float32)
    advantages[valid] = scored
    return advantages
