"""The reward and reference stages as consumers of a real store: they run side by side on the rollout workers'
entries, add their columns, and hand each entry on to the trainer's stream once both are there."""

import math
import time

import pyarrow as pa
import pytest
import torch

from asyncrl.config import load_config
from asyncrl.models import build_tiny_model
from asyncrl.stages import StageWorker
from asyncrl.types import GENERATED_SCHEMA, TRAJECTORY_SCHEMA, Groups, Streams, table_from_rows
from tests.conftest import first_server_only
from tests.integration.test_store_restart import _until

pytestmark = first_server_only


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("stages") / "model", seed=0))


def _config(store, *overrides: str):
    return load_config("configs/tiny.yaml", [f"run.name={store.run_id}", *overrides])


def _generated(rows: int = 4) -> pa.Table:
    """A group as a rollout worker with stages.reward puts it: unscored, with prompt text and answer."""
    responses = [[30, 31, 32], [33, 34], [35, 36, 37, 38], [39]][:rows]
    answers = ["7", "7", "7", "7"][:rows]
    return table_from_rows(
        [
            {
                "sample_id": f"g0:{i}", "prompt_id": "p0", "group_id": "g0", "prompt_ids": [5, 6, 7, 8, 9][: 3 + i % 2],
                "response_ids": response, "behavior_logprobs": [-1.0] * len(response),
                "token_versions": [0] * len(response), "version_start": 0, "version_end": 0, "finish_reason": "stop",
                "worker_id": "rollout-0", "gen_seconds": 0.1, "loss_mask": None, "prompt_text": "What is 3+4?",
                "answer": answer,
            }
            for i, (response, answer) in enumerate(zip(responses, answers, strict=True))
        ],
        GENERATED_SCHEMA,
    )  # fmt: skip


def _trained(store, timeout_s: float = 60.0) -> list:
    store.ensure_group(Streams.TRAJECTORIES, Groups.TRAINER)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if entries := store.read(Streams.TRAJECTORIES, Groups.TRAINER, "t", block_ms=200, expect=TRAJECTORY_SCHEMA):
            return entries
    return []


def _full_forward_logprobs(model_path: str, prompt: list[int], response: list[int]) -> list[float]:
    """The reference log-probs worked out the long way: a whole-sequence forward and a log_softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[len(prompt) + j - 1, token]) for j, token in enumerate(response)]


def _stopped(*workers):
    for worker in workers:
        worker.stop()


def test_both_stages_add_their_columns_and_the_entry_reaches_the_trainer_once_both_are_there(
    store, redis_url, tiny_model
):
    cfg = _config(store, "stages.reward=true", "stages.reference=true")
    store.ensure_group(Streams.GENERATED, Groups.REWARD)
    store.ensure_group(Streams.GENERATED, Groups.REFERENCE)
    table = _generated()
    store.put(Streams.GENERATED, table, {"rows": table.num_rows})
    reward = StageWorker(cfg, tiny_model, redis_url, "reward")
    try:
        # Only the reward stage runs: it adds its columns, but the entry waits for the reference's.
        deadline = time.monotonic() + 30
        while reward.stats()["entries"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reward.stats()["entries"] == 1 and reward.health() is None
        assert _trained(store, timeout_s=1.0) == []
        reference = StageWorker(cfg, tiny_model, redis_url, "reference")
        try:
            entries = _trained(store)
        finally:
            _stopped(reference)
    finally:
        _stopped(reward)
    assert len(entries) == 1 and store.length(Streams.TRAJECTORIES) == 1
    got = entries[0].table
    assert got.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    assert not any(got.column("reward_failed").to_pylist())
    assert all(math.isfinite(r) for r in got.column("reward").to_pylist())
    refs = got.column("ref_logprobs").to_pylist()
    for row, ref in enumerate(refs):
        prompt, response = table.column("prompt_ids")[row].as_py(), table.column("response_ids")[row].as_py()
        assert ref == pytest.approx(_full_forward_logprobs(tiny_model, prompt, response), abs=1e-5)
    assert store.inflight(Streams.GENERATED)[0] == 0  # handed on, not left behind


def test_the_reward_stage_scores_with_the_runs_reward_and_a_failing_reward_fails_only_its_sample(
    store, redis_url, tiny_model
):
    cfg = _config(store, "stages.reward=true", "reward.fn=tests.integration.test_stages:_picky_reward")
    store.ensure_group(Streams.GENERATED, Groups.REWARD)
    table = _generated()
    store.put(Streams.GENERATED, table, {"rows": table.num_rows})
    reward = StageWorker(cfg, tiny_model, redis_url, "reward")
    try:
        entries = _trained(store)
    finally:
        _stopped(reward)
    got = entries[0].table
    lengths = [len(r) for r in table.column("response_ids").to_pylist()]
    expected = [None if n == 1 else float(n) for n in lengths]  # the one-token response raises
    assert [
        None if f else r
        for r, f in zip(got.column("reward").to_pylist(), got.column("reward_failed").to_pylist(), strict=True)
    ] == expected
    assert got.column("reward_error").to_pylist()[lengths.index(1)] == "ValueError"


def _picky_reward(prompt: str, response: str, answer: str = "", **_) -> float:
    """Counts the response's characters as a stand-in score (the tiny tokenizer decodes each id to one or more
    characters); raises on the shortest response so a failure is seen. Named by the config above."""
    if len(response) <= 1:
        raise ValueError("too short")
    return float(len(response))


def test_a_restarted_stage_takes_back_the_entries_its_previous_process_read(store, redis_url, tiny_model):
    cfg = _config(store, "stages.reward=true")
    store.ensure_group(Streams.GENERATED, Groups.REWARD)
    table = _generated()
    store.put(Streams.GENERATED, table, {"rows": table.num_rows})
    # The previous process read the entry under the stage's consumer name and died before handing it on.
    assert len(store.read(Streams.GENERATED, Groups.REWARD, "reward-0", block_ms=100)) == 1
    assert store.read(Streams.GENERATED, Groups.REWARD, "reward-0", block_ms=100) == []
    reward = StageWorker(cfg, tiny_model, redis_url, "reward")
    try:
        entries = _trained(store)
    finally:
        _stopped(reward)
    assert len(entries) == 1 and entries[0].table.num_rows == 4
    assert store.pending(Streams.GENERATED, Groups.REWARD) == 0


def _entry_of(prompt_id: str, token: int = 5) -> pa.Table:
    """``_generated()`` as prompt ``prompt_id``'s group, its prompts starting with token id ``token``."""
    table = _generated()
    prompts = [[token, *ids[1:]] for ids in table.column("prompt_ids").to_pylist()]
    table = table.set_column(
        table.schema.get_field_index("prompt_ids"), "prompt_ids", pa.array(prompts, pa.list_(pa.int32()))
    )
    return table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", pa.array([prompt_id] * 4))


def test_an_entry_the_stage_raises_on_is_set_aside_and_reported_and_the_stage_goes_on(store, redis_url, tiny_model):
    """A token id past the vocabulary makes the reference model's embedding raise (a real fault, not a fake): that
    entry goes to the dead-letter stream with the error and its prompt to the dropped stream; the next is handled."""
    cfg = _config(store, "stages.reward=true", "stages.reference=true")
    store.ensure_group(Streams.GENERATED, Groups.REFERENCE)
    store.ensure_group(Streams.DROPPED, Groups.CONTROLLER)
    for table in (_entry_of("p7", token=10**6), _entry_of("p8")):
        store.put(Streams.GENERATED, table, {"rows": table.num_rows})
    reference = StageWorker(cfg, tiny_model, redis_url, "reference")
    try:
        stats = _until(
            "two entries handled", lambda: (s := reference.stats())["entries"] + s["failed"] == 2 and s, 60.0
        )
        assert stats["entries"] == 1 and stats["failed"] == 1 and reference.health() is None
    finally:
        _stopped(reference)
    (dead,) = store.dead_letters(Streams.GENERATED)
    assert dead.group == Groups.REFERENCE and "reference stage raised IndexError" in dead.reason
    dropped = store.read(Streams.DROPPED, Groups.CONTROLLER, "driver", count=10, block_ms=100)
    assert [entry.table.column("prompt_id").to_pylist() for entry in dropped] == [["p7"]]
    assert store.pending(Streams.GENERATED, Groups.REFERENCE) == 0  # p8's entry was advanced, p7's set aside


def test_a_stage_that_raises_on_every_entry_ends_with_the_error(store, redis_url, tiny_model):
    from asyncrl.stages.worker import MAX_FAILED_IN_A_ROW

    cfg = _config(store, "stages.reference=true")
    store.ensure_group(Streams.GENERATED, Groups.REFERENCE)
    for index in range(MAX_FAILED_IN_A_ROW):
        table = _entry_of(f"p{index}", token=10**6)
        store.put(Streams.GENERATED, table, {"rows": table.num_rows})
    reference = StageWorker(cfg, tiny_model, redis_url, "reference")
    try:
        error = _until("the stage's error", reference.health, 60.0)
    finally:
        _stopped(reference)
    assert (
        "StageBroken" in error and "IndexError" in error and f"on the {MAX_FAILED_IN_A_ROW - 1} entries before" in error
    )
    assert reference.stats()["failed"] == MAX_FAILED_IN_A_ROW
