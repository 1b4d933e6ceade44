"""Staged weight updates (rollout/staged_weights.py) against vLLM's own reload, on the real CPU engine.

- The same two successive updates (both spare buffers get used) through the staged path and through
  ``reload_weights`` give the same tokens and the same log-probs, within 1e-5.
- A tensor the engine has no parameter for is refused by name, and the engine falls back to the reload.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.sync.plan import module_tensors  # noqa: E402
from rollout.engine import GenerationEngine, _model_on_worker  # noqa: E402
from rollout.staged_weights import StagedWeights, StagingUnsupported  # noqa: E402

TOLERANCE = 1e-5
PROMPTS = [[5 + i, 17, 42, 7 * i + 3] for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny"))


def _updates(model_dir: str) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    tensors = module_tensors(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    generator = torch.Generator().manual_seed(7)
    return [
        {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in tensors.items()}
        for _ in range(2)
    ]


def _sample_after_updates(model_dir: str, updates: list[dict], staged: bool) -> tuple[list, bool]:
    engine = GenerationEngine(model_dir, max_model_len=256, max_num_seqs=16, kv_cache_mb=64, staged_updates=staged)
    try:
        samples = []
        for version, update in enumerate(updates, 1):
            engine.update_weights(list(update.items()), version)
            for i, prompt in enumerate(PROMPTS):
                engine.add_request(f"v{version}-{i}", prompt, max_new_tokens=12, seed=i)
            finished = []
            while engine.num_unfinished():
                finished.extend(engine.step())
            samples += sorted((seq.request_id, seq.response_ids, seq.logprobs) for seq in finished)
        return samples, engine._staged is not None
    finally:
        engine.close()


def test_staged_updates_equal_vllm_reload(model_dir: str) -> None:
    updates = _updates(model_dir)
    staged, used_staging = _sample_after_updates(model_dir, updates, staged=True)
    reloaded, _ = _sample_after_updates(model_dir, updates, staged=False)
    assert used_staging, "the staged path fell back to vLLM's reload"
    assert [(rid, tokens) for rid, tokens, _ in staged] == [(rid, tokens) for rid, tokens, _ in reloaded]
    ours = [logprob for _, _, logprobs in staged for logprob in logprobs]
    theirs = [logprob for _, _, logprobs in reloaded for logprob in logprobs]
    error = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    assert error <= TOLERANCE


def test_an_unknown_tensor_is_refused_by_name_and_the_engine_reloads(model_dir: str) -> None:
    engine = GenerationEngine(model_dir, max_model_len=256, max_num_seqs=16, kv_cache_mb=64)
    try:
        (model,) = engine._engine.collective_rpc(_model_on_worker)
        with pytest.raises(StagingUnsupported, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
            StagedWeights(model, [("model.layers.0.mlp.extra_proj.weight", (4, 4))])
        update = {name: tensor.clone() for name, tensor in _updates(model_dir)[0].items()}
        first = next(iter(update))
        update[first.replace("embed_tokens", "unknown_embed")] = update.pop(first)
        with pytest.raises(ValueError, match="unknown_embed"):  # vLLM's loader refuses the name too
            engine.update_weights(list(update.items()), 1)
        assert engine._staged_updates is False and engine._staged is None
    finally:
        engine.close()
