"""collate: trajectory rows to padded, aligned training tensors."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from asyncrl.algorithms import grpo_advantages
from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows
from trainers.batch import GroupScorer, Scoring, collate, varied_groups, with_advantages

PAD = 99


def _row(sample_id: str, group_id: str, prompt: list[int], response: list[int], reward: float, failed: bool = False):
    return {
        "sample_id": sample_id,
        "prompt_id": group_id,
        "group_id": group_id,
        "prompt_ids": prompt,
        "response_ids": response,
        "behavior_logprobs": [-0.5 - i for i in range(len(response))],
        "token_versions": [0] * len(response),
        "version_start": 0,
        "version_end": 0,
        "reward": reward,
        "reward_failed": failed,
        "finish_reason": "stop",
        "worker_id": "w0",
        "gen_seconds": 0.1,
    }


def _table(rows: list[dict]) -> pa.Table:
    return table_from_rows(rows, TRAJECTORY_SCHEMA)


def test_collate_pads_right_and_aligns_response_positions() -> None:
    table = _table(
        [
            _row("a0", "a", [1, 2, 3], [4, 5], reward=1.0),
            _row("a1", "a", [1, 2, 3], [6], reward=0.0),
            _row("b0", "b", [7], [8, 9, 10, 11], reward=2.0),
            _row("b1", "b", [7], [12], reward=0.0),
        ]
    )

    batch = collate(table, pad_id=PAD)

    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "behavior_logprobs", "advantages"}
    assert batch["input_ids"].shape == (4, 5) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [1, 2, 3, 6, PAD],
        [7, 8, 9, 10, 11],
        [7, 12, PAD, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0]]
    # behaviour log-prob i of a response sits at the position of response token i
    assert batch["behavior_logprobs"][0].tolist() == [0, 0, 0, -0.5, -1.5]
    assert batch["behavior_logprobs"][2].tolist() == [0, -0.5, -1.5, -2.5, -3.5]
    assert batch["behavior_logprobs"][3].tolist() == [0, -0.5, 0, 0, 0]
    assert torch.equal(batch["behavior_logprobs"] != 0, batch["response_mask"].bool())
    assert batch["advantages"].shape == (4,)
    expected = grpo_advantages(torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(batch["advantages"], expected)


def test_collate_excludes_failed_rewards_from_their_group() -> None:
    table = _table(
        [
            _row("a0", "a", [1], [2], reward=1.0),
            _row("a1", "a", [1], [3], reward=0.0),
            _row("a2", "a", [1], [4], reward=1000.0, failed=True),  # must not shift the group's mean
            _row("a3", "a", [1], [5], reward=0.5),
            _row("b0", "b", [1], [6], reward=0.0, failed=True),
            _row("b1", "b", [1], [7], reward=3.0),  # the only valid row of its group: no signal
        ]
    )

    advantages = collate(table, pad_id=PAD)["advantages"]

    expected = grpo_advantages(torch.tensor([1.0, 0.0, 0.5]), torch.zeros(3, dtype=torch.int64))
    assert torch.allclose(advantages[[0, 1, 3]], expected)
    assert advantages[2].item() == 0.0
    assert advantages[4:].tolist() == [0.0, 0.0]


def test_collate_treats_a_null_reward_as_failed() -> None:
    rows = [
        _row("a0", "a", [1], [2], reward=1.0),
        _row("a1", "a", [1], [3], reward=0.0),
        _row("a2", "a", [1], [4], 0.0),
    ]
    rows[2]["reward"] = None
    advantages = collate(_table(rows), pad_id=PAD)["advantages"]
    assert advantages[2].item() == 0.0
    assert advantages[0] > 0 > advantages[1]


def test_collate_rejects_logprobs_that_do_not_match_the_response() -> None:
    row = _row("a0", "a", [1], [2, 3], reward=1.0)
    row["behavior_logprobs"] = [-0.1]
    with pytest.raises(ValueError, match="'a0': 1 behavior_logprobs for 2 response tokens"):
        collate(_table([row]), pad_id=PAD)


def test_with_advantages_keeps_group_statistics_when_a_group_is_split_across_micro_batches() -> None:
    rows = [_row(f"a{i}", "a", [1], [2 + i], reward=float(i)) for i in range(4)]
    rows.append(_row("a4", "a", [1], [9], reward=7.0, failed=True))
    whole = collate(_table(rows), pad_id=PAD)["advantages"]

    scored = with_advantages(_table(rows))
    split = [collate(scored.slice(0, 2), pad_id=PAD), collate(scored.slice(2), pad_id=PAD)]

    assert scored.schema.field("advantages").type == pa.float32()
    assert torch.allclose(torch.cat([batch["advantages"] for batch in split]), whole)
    assert whole[4].item() == 0.0
    # collate alone on half a group would standardise within the half instead
    assert not torch.allclose(collate(_table(rows[:2]), pad_id=PAD)["advantages"], whole[:2])
    # a second with_advantages replaces the column rather than adding another
    assert with_advantages(scored).column_names.count("advantages") == 1


def test_with_advantages_uses_the_named_estimator_and_skips_failed_rows() -> None:
    rows = [
        _row("a0", "a", [1], [2], reward=3.0),
        _row("a1", "a", [1], [3], reward=1.0),
        _row("a2", "a", [1], [4], reward=1000.0, failed=True),
        _row("a3", "a", [1], [5], reward=2.0),
    ]

    scored = with_advantages(_table(rows), Scoring(advantage="rloo"))

    # RLOO over the valid rewards 3, 1, 2: 3 - 1.5 = 1.5, 1 - 2.5 = -1.5, 2 - 2 = 0; the failed row 0
    assert scored.column("advantages").to_pylist() == pytest.approx([1.5, -1.5, 0.0, 0.0])


def test_with_advantages_applies_the_overlong_penalty_to_the_reward_only_for_scoring() -> None:
    rows = [
        _row("a0", "a", [1], [2] * 4, reward=1.0),
        _row("a1", "a", [1], [2] * 9, reward=1.0),
    ]
    scoring = Scoring(advantage="dr_grpo", max_response_len=10, overlong_buffer=4)

    scored = with_advantages(_table(rows), scoring)

    # free up to 10 - 4 = 6 tokens: 4 tokens -> 0, 9 tokens -> -(9 - 6) / 4 = -0.75
    # shaped rewards 1 and 0.25, mean 0.625 -> Dr. GRPO advantages 0.375 and -0.375
    assert scored.column("advantages").to_pylist() == pytest.approx([0.375, -0.375])
    assert scored.column("reward").to_pylist() == [1.0, 1.0]  # the task reward is what gets logged
    # without the penalty the two equal rewards carry no signal
    assert with_advantages(_table(rows), Scoring(advantage="dr_grpo")).column("advantages").to_pylist() == [0.0, 0.0]


def test_varied_groups_drops_groups_whose_valid_rewards_are_all_equal() -> None:
    table = _table(
        [
            _row("a0", "a", [1], [2], reward=1.0),
            _row("a1", "a", [1], [3], reward=0.0),
            _row("a2", "a", [1], [4], reward=0.0, failed=True),  # stays with its kept group
            _row("b0", "b", [1], [2], reward=1.0),
            _row("b1", "b", [1], [3], reward=1.0),
            _row("c0", "c", [1], [2], reward=2.0),
            _row("c1", "c", [1], [3], reward=5.0, failed=True),  # one valid reward: no spread
        ]
    )

    kept = varied_groups(table)

    assert kept.column("sample_id").to_pylist() == ["a0", "a1", "a2"]
    # the filter looks at the task reward: lengths that the overlong penalty would separate do not count
    same_reward = _table([_row("d0", "d", [1], [2] * 4, reward=1.0), _row("d1", "d", [1], [2] * 9, reward=1.0)])
    assert varied_groups(same_reward).num_rows == 0


def test_group_scorer_scores_each_group_as_it_arrives() -> None:
    scorer = GroupScorer(Scoring(), samples_per_step=4)
    group = _table([_row("a0", "a", [1], [2], reward=1.0), _row("a1", "a", [1], [3], reward=0.0)])

    assert scorer.accept(group)
    ready = scorer.ready()

    assert len(ready) == 1
    assert ready[0].column("advantages").to_pylist() == with_advantages(group).column("advantages").to_pylist()
    assert scorer.ready() == []  # handed out once


def test_group_scorer_holds_a_batch_scoped_estimator_until_the_batch_is_complete() -> None:
    scorer = GroupScorer(Scoring(advantage="reinforce_pp"), samples_per_step=4)
    first = _table([_row("a0", "a", [1], [2], reward=2.0), _row("a1", "a", [1], [3], reward=2.0)])
    second = _table([_row("b0", "b", [1], [2], reward=0.0), _row("b1", "b", [1], [3], reward=1.0)])

    assert scorer.accept(first) and scorer.ready() == []
    assert scorer.accept(second)
    ready = scorer.ready()

    # REINFORCE++ over the 4 rewards 2 2 0 1: mean 1.25, std 0.957427 (see test_advantages)
    assert len(ready) == 1 and ready[0].num_rows == 4
    assert ready[0].column("advantages").to_pylist() == pytest.approx(
        [0.783349, 0.783349, -1.305582, -0.261116], rel=1e-5
    )


def test_group_scorer_filters_equal_reward_groups_when_asked() -> None:
    equal = _table([_row("a0", "a", [1], [2], reward=1.0), _row("a1", "a", [1], [3], reward=1.0)])
    varied = _table([_row("b0", "b", [1], [2], reward=1.0), _row("b1", "b", [1], [3], reward=0.0)])

    filtering = GroupScorer(Scoring(filter_equal_groups=True), samples_per_step=4)
    assert not filtering.accept(equal)
    assert filtering.ready() == []
    assert filtering.accept(varied)
    assert [t.column("sample_id").to_pylist() for t in filtering.ready()] == [["b0", "b1"]]

    keeping = GroupScorer(Scoring(), samples_per_step=4)
    assert keeping.accept(equal)
    assert keeping.ready()[0].column("advantages").to_pylist() == [0.0, 0.0]


def test_collate_aligns_ref_logprobs_when_the_table_has_them() -> None:
    table = _table([_row("a0", "a", [1, 2], [3, 4], reward=1.0), _row("a1", "a", [1], [5], reward=0.0)])
    assert "ref_logprobs" not in collate(table, pad_id=PAD)

    with_ref = table.append_column("ref_logprobs", pa.array([[-0.25, -0.75], [-1.25]], type=pa.list_(pa.float32())))
    batch = collate(with_ref, pad_id=PAD)

    # aligned as behavior_logprobs: response token i at the position of that token
    assert batch["ref_logprobs"].tolist() == [[0.0, 0.0, -0.25, -0.75], [0.0, -1.25, 0.0, 0.0]]

    bad = table.append_column("ref_logprobs", pa.array([[-0.25], [-1.25]], type=pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="'a0': 1 ref_logprobs for 2 response tokens"):
        collate(bad, pad_id=PAD)


def test_a_loss_mask_keeps_observation_tokens_out_of_training() -> None:
    """A multi-turn row: response = turn 1 (2 tokens), an observation (2 tokens, masked), turn 2 (1 token)."""
    turns = {**_row("m0", "m", [1, 2], [3, 4, 50, 51, 5], reward=1.0), "loss_mask": [1, 1, 0, 0, 1]}
    turns["behavior_logprobs"] = [-0.1, -0.2, 0.0, 0.0, -0.3]  # placeholders where the environment wrote
    plain = _row("m1", "m", [1, 2], [6, 7], reward=0.0)  # no loss_mask (null): every response token trains
    batch = collate(_table([turns, plain]), pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 50, 51, 5], [1, 2, 6, 7, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0, 0]]
    assert batch["behavior_logprobs"][0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, 0, -0.3])


def test_a_loss_mask_of_the_wrong_length_names_the_trajectory() -> None:
    row = {**_row("bad0", "b", [1], [2, 3], reward=1.0), "loss_mask": [1]}
    with pytest.raises(ValueError, match=r"'bad0': 1 loss_mask entries for 2 response tokens"):
        collate(_table([row, _row("b1", "b", [1], [4], reward=0.0)]), pad_id=PAD)


def test_mask_summary_counts_turns_and_observation_tokens() -> None:
    from trainers.batch import mask_summary

    assert mask_summary(None) == {}
    assert mask_summary([1, 1]) == {"turns": 1, "trained_tokens": 2, "observation_tokens": 0}
    assert mask_summary([1, 1, 0, 0, 1, 0, 1, 1]) == {"turns": 3, "trained_tokens": 5, "observation_tokens": 3}


def _collate_per_row(table: pa.Table, pad_id: int) -> dict[str, torch.Tensor]:
    """The per-row tensor writes ``collate`` did before it built padded lists: the reference its values must equal."""
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    behavior, masks = table.column("behavior_logprobs").to_pylist(), table.column("loss_mask").to_pylist()
    reference = table.column("ref_logprobs").to_pylist()
    shape = (table.num_rows, max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)))
    out = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.int64),
        "attention_mask": torch.zeros(shape, dtype=torch.int64),
        "response_mask": torch.zeros(shape),
        "behavior_logprobs": torch.zeros(shape),
        "ref_logprobs": torch.zeros(shape),
    }
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        start, end = len(prompt), len(prompt) + len(response)
        out["input_ids"][row, :end] = torch.tensor(prompt + response)
        out["attention_mask"][row, :end] = 1
        out["response_mask"][row, start:end] = (
            1.0 if masks[row] is None else torch.tensor(masks[row], dtype=torch.float)
        )
        out["behavior_logprobs"][row, start:end] = torch.tensor(behavior[row], dtype=torch.float32)
        out["ref_logprobs"][row, start:end] = torch.tensor(reference[row], dtype=torch.float32)
    return out


def test_collate_equals_per_row_tensor_writes() -> None:
    import random

    rng = random.Random(0)
    rows = []
    for index in range(7):
        prompt = [rng.randrange(100) for _ in range(rng.randint(1, 9))]
        response = [rng.randrange(100) for _ in range(rng.randint(1, 12))]
        row = _row(f"s{index}", f"g{index // 3}", prompt, response, reward=float(index % 2))
        row["behavior_logprobs"] = [-rng.expovariate(1.0) for _ in response]
        row["loss_mask"] = [rng.randint(0, 1) for _ in response] if index % 2 else None
        rows.append(row)
    table = _table(rows)
    ref = pa.array(
        [[-rng.random() for _ in r] for r in table.column("response_ids").to_pylist()], pa.list_(pa.float32())
    )
    table = with_advantages(table.append_column("ref_logprobs", ref))

    batch, expected = collate(table, pad_id=PAD), _collate_per_row(table, pad_id=PAD)
    for key, tensor in expected.items():
        assert batch[key].dtype == tensor.dtype and torch.equal(batch[key], tensor), key
    assert torch.equal(batch["advantages"], torch.tensor(table.column("advantages").to_pylist()))


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("overlong_buffer", [0, 2])
def test_groups_scored_together_get_what_each_gets_alone(advantage: str, overlong_buffer: int) -> None:
    """``GroupScorer.ready`` scores every held group in one call: each group's advantages equal its own scoring."""
    scoring = Scoring(advantage=advantage, max_response_len=4, overlong_buffer=overlong_buffer)
    first = _table([_row(f"a{i}", "a", [1], [2] * (i + 1), reward=[0.0, 1.0, 0.5, 1.0][i]) for i in range(4)])
    failed = _row("b2", "b", [1], [3, 3], reward=1.0, failed=True)
    second = _table([_row("b0", "b", [1], [3], reward=0.25), _row("b1", "b", [1], [3] * 4, reward=1.0), failed])
    scorer = GroupScorer(scoring, samples_per_step=7)
    assert scorer.accept(first) and scorer.accept(second)
    (together,) = scorer.ready()
    alone = [with_advantages(group, scoring).column("advantages").to_pylist() for group in (first, second)]
    assert together.column("sample_id").to_pylist() == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert together.column("advantages").to_pylist() == alone[0] + alone[1]
    assert alone[1][2] == 0.0 and alone[0][0] != 0.0
