"""Multi-turn episodes through the real in-process vLLM engine (rollout.multiturn) on the tiny Qwen2.

Checks what the trainer relies on: the observation tokens sit between the turns with loss mask 0 and
placeholder log-probs, and every later turn was sampled from exactly the trajectory's token context
(its behaviour log-probs match a transformers forward pass over prompt + response).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from asyncrl.envs import CalculatorEnv  # noqa: E402
from asyncrl.models import build_tiny_model  # noqa: E402
from rollout.engine import GenerationEngine  # noqa: E402
from rollout.multiturn import MultiTurnDriver  # noqa: E402

MAX_TURNS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def _runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(bit, start, end) of each run of equal bits."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def test_episodes_append_masked_observations_and_continue_from_the_token_context(model_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    engine = GenerationEngine(str(model_dir), max_model_len=256, max_num_seqs=8, kv_cache_mb=64, seed=0)
    try:
        driver = MultiTurnDriver(
            engine, tokenizer, CalculatorEnv, max_turns=MAX_TURNS, max_model_len=256,
            encode_prompt=lambda text: tokenizer(text)["input_ids"], sampling={"temperature": 1.0, "top_p": 1.0},
        )  # fmt: skip
        for j in range(2):
            driver.start(f"g:{j}", "What is 2 + 3?", {"answer": "5"}, max_new_tokens=6)
        episodes = []
        for _ in range(200):
            if not engine.num_unfinished():
                break
            episodes += [done for seq in engine.step() if (done := driver.advance(seq)) is not None]
    finally:
        engine.close()
    assert sorted(e.request_id for e in episodes) == ["g:0", "g:1"] and not driver.episodes
    reminder = tokenizer(CalculatorEnv.REMINDER, add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for episode in episodes:
        # The random model writes neither `CALC:` nor `ANSWER:`: a reminder after each turn but the last.
        assert (episode.turns, episode.finish_reason) == (MAX_TURNS, "max_turns")
        assert (episode.scored.reward, episode.scored.failed) == (0.0, False)
        n = len(episode.response_ids)
        assert len(episode.loss_mask) == len(episode.logprobs) == len(episode.token_versions) == n
        runs = _runs(episode.loss_mask)
        assert [bit for bit, _, _ in runs] == [1, 0, 1, 0, 1]
        for bit, start, end in runs:
            if bit == 0:
                assert episode.response_ids[start:end] == reminder
                assert episode.logprobs[start:end] == [0.0] * (end - start)  # placeholders
            else:
                assert 1 <= end - start <= 6 and all(lp < 0 for lp in episode.logprobs[start:end])
        assert set(episode.token_versions) == {0}
        # Each sampled token's behaviour log-prob is the model's over the whole trajectory context.
        ids = torch.tensor([episode.prompt_ids + episode.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(episode.prompt_ids) - 1 : -1].float()
        reference = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(episode.prompt_ids) :, None])[:, 0]
        sampled = torch.tensor(episode.loss_mask, dtype=torch.bool)
        error = (reference[sampled] - torch.tensor(episode.logprobs)[sampled]).abs().max()
        assert float(error) < 1e-4
