"""Trajectory rows (Arrow, ``TRAJECTORY_SCHEMA``) to the padded tensors one training micro-batch needs."""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import Tensor

from asyncrl.algorithms import grpo_advantages


def collate(table: pa.Table, pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``prompt_ids + response_ids`` of every row into one batch.

    Returns, with ``B`` rows and ``L`` the longest prompt plus response:

    - ``input_ids`` ``[B, L]`` int64, ``pad_id`` after each sequence;
    - ``attention_mask`` ``[B, L]`` int64, 1 on real tokens;
    - ``response_mask`` ``[B, L]`` float32, 1 on response tokens (the tokens that are trained);
    - ``behavior_logprobs`` ``[B, L]`` float32, each response token's sampling log-prob at that
      token's position (the alignment of ``asyncrl.algorithms.sequence_logprobs``), 0 elsewhere;
    - ``advantages`` ``[B]`` float32: the table's ``advantages`` column when it has one (see
      ``with_advantages``), else GRPO advantages over these rows' ``group_id`` and ``reward``.

    Without an ``advantages`` column a group's statistics come from the rows of this table only,
    so the rows of a group must arrive together; a trainer that splits groups across
    micro-batches runs ``with_advantages`` on each whole group first.
    """
    if table.num_rows == 0:
        raise ValueError("collate needs at least one trajectory row")
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    behavior = table.column("behavior_logprobs").to_pylist()
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    batch_size, max_len = table.num_rows, max(lengths)

    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.int64)
    response_mask = torch.zeros((batch_size, max_len), dtype=torch.float32)
    behavior_logprobs = torch.zeros((batch_size, max_len), dtype=torch.float32)
    sample_ids = table.column("sample_id").to_pylist()
    for row, (prompt, response, logprobs) in enumerate(zip(prompts, responses, behavior, strict=True)):
        if len(logprobs) != len(response):
            raise ValueError(
                f"trajectory {sample_ids[row]!r}: {len(logprobs)} behavior_logprobs for {len(response)} response tokens"
            )
        start, end = len(prompt), len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response, dtype=torch.int64)
        attention_mask[row, :end] = 1
        response_mask[row, start:end] = 1.0
        behavior_logprobs[row, start:end] = torch.tensor(logprobs, dtype=torch.float32)

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "behavior_logprobs": behavior_logprobs,
        "advantages": _column_or_grpo_advantages(table),
    }


def with_advantages(table: pa.Table) -> pa.Table:
    """``table`` plus a float32 ``advantages`` column (one per row, replacing any old one).

    GRPO over the rows' ``group_id`` and ``reward``, so pass whole groups. A row with
    ``reward_failed`` (or a null reward) is left out of its group's statistics and gets
    advantage 0: it still passes through the model but moves no weight.
    """
    values = pa.array(_grpo_advantages(table).tolist(), type=pa.float32())
    if "advantages" in table.column_names:
        return table.set_column(table.column_names.index("advantages"), "advantages", values)
    return table.append_column("advantages", values)


def _column_or_grpo_advantages(table: pa.Table) -> Tensor:
    if "advantages" not in table.column_names:
        return _grpo_advantages(table)
    column = table.column("advantages")
    if not pa.types.is_floating(column.type):
        raise ValueError(f"the advantages column must hold one float per row, got {column.type}")
    values = column.to_pylist()
    if any(value is None for value in values):
        raise ValueError("the advantages column has nulls; run with_advantages on whole groups first")
    return torch.tensor(values, dtype=torch.float32)


def _grpo_advantages(table: pa.Table) -> Tensor:
    rewards = table.column("reward").to_pylist()
    failed = (
        table.column("reward_failed").to_pylist() if "reward_failed" in table.column_names else [False] * len(rewards)
    )
    valid = [reward is not None and not bad for reward, bad in zip(rewards, failed, strict=True)]
    group_codes = table.column("group_id").combine_chunks().dictionary_encode().indices.to_pylist()

    advantages = torch.zeros(table.num_rows, dtype=torch.float32)
    keep = torch.tensor(valid, dtype=torch.bool)
    if keep.any():
        kept_rewards = torch.tensor([r for r, ok in zip(rewards, valid, strict=True) if ok], dtype=torch.float32)
        kept_groups = torch.tensor(group_codes, dtype=torch.int64)[keep]
        advantages[keep] = grpo_advantages(kept_rewards, kept_groups)
    return advantages
