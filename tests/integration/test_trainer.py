"""PolicyTrainer: real DeepSpeed engines (gloo, CPU) on a tiny Qwen2.

The first DeepSpeed start on a machine compiles a C++ op (~40 s or more, cached under
TORCH_EXTENSIONS_DIR); later starts take a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows  # noqa: E402
from trainers.batch import collate  # noqa: E402
from trainers.policy import PolicyTrainer  # noqa: E402

LOGPROB_TOLERANCE = 1e-5
PAD_ID = 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2") / "model", seed=0)


@pytest.fixture(scope="module")
def trainer(model_dir: Path) -> PolicyTrainer:
    return PolicyTrainer(str(model_dir), lr=1e-3, zero_stage=1, micro_batch_size=4, seed=0)


def _batch(seed: int = 0, rows: int = 4) -> dict[str, torch.Tensor]:
    """Two groups of random prompts and responses of mixed lengths (so there is padding)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(length: int) -> list[int]:
        return torch.randint(1, 400, (length,), generator=generator).tolist()

    table_rows = []
    for index in range(rows):
        group = index // 2
        response = tokens(3 + 2 * index)
        table_rows.append(
            {
                "sample_id": f"s{index}",
                "prompt_id": f"p{group}",
                "group_id": f"p{group}",
                "prompt_ids": tokens(4 + group),
                "response_ids": response,
                "behavior_logprobs": [0.0] * len(response),
                "token_versions": [0] * len(response),
                "version_start": 0,
                "version_end": 0,
                "reward": float(index % 2),
                "reward_failed": False,
                "finish_reason": "length",
                "worker_id": "w0",
                "gen_seconds": 0.0,
            }
        )
    return collate(table_from_rows(table_rows, TRAJECTORY_SCHEMA), pad_id=PAD_ID)


def _on_policy(trainer: PolicyTrainer, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as if the trainer's current weights had sampled it, with advantage +1 on every response."""
    return {**batch, "behavior_logprobs": trainer.logprobs(batch), "advantages": torch.ones(len(batch["input_ids"]))}


def _reference_logprobs(model_dir: Path, weights: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_softmax = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(log_softmax, -1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0)) * batch["response_mask"]


def test_logprobs_match_a_plain_transformers_forward(trainer: PolicyTrainer, model_dir: Path) -> None:
    batch = _batch(seed=1)
    weights = dict(trainer.named_weights())

    logprobs = trainer.logprobs(batch)

    assert logprobs.shape == batch["input_ids"].shape and logprobs.dtype == torch.float32
    assert torch.equal(logprobs != 0, batch["response_mask"].bool())
    error = (logprobs - _reference_logprobs(model_dir, weights, batch)).abs().max().item()
    assert error <= LOGPROB_TOLERANCE


def test_named_weights_use_the_checkpoint_names(trainer: PolicyTrainer, model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
        checkpoint_shapes = {name: tuple(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys()}
    hf_names = set(transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict())

    weights = dict(trainer.named_weights())

    assert {name: tuple(tensor.shape) for name, tensor in weights.items()} == checkpoint_shapes
    assert set(weights) == hf_names - {"lm_head.weight"}  # the tied alias is not sent twice
    assert all(t.device.type == "cpu" and not t.requires_grad for t in weights.values())


def test_steps_raise_the_logprobs_of_positively_rewarded_responses(trainer: PolicyTrainer) -> None:
    batch = _on_policy(trainer, _batch(seed=2))
    before_weights = dict(trainer.named_weights())
    mask = batch["response_mask"]
    before = (batch["behavior_logprobs"] * mask).sum().item()

    losses, steps = [], []
    for _ in range(3):
        losses.append(trainer.forward_backward(batch)["loss"])
        steps.append(trainer.optimizer_step())
    # lr 1e-3 pushes every ratio past 1 + clip_eps in one step; later steps move on Adam momentum
    assert steps[0]["grad_norm"] > 0 and steps[0]["lr"] == pytest.approx(1e-3)

    after = (trainer.logprobs(batch) * mask).sum().item()
    assert losses[0] == pytest.approx(-1.0, abs=1e-6)  # ratio 1, advantage 1
    assert losses[-1] < losses[0]
    assert after > before
    changed = [name for name, tensor in trainer.named_weights() if not torch.equal(tensor, before_weights[name])]
    assert sorted(changed) == sorted(before_weights)
    # the snapshot taken before the steps is a copy, not a view of the live weights
    assert not torch.equal(
        before_weights["model.embed_tokens.weight"], dict(trainer.named_weights())["model.embed_tokens.weight"]
    )


def test_zero2_accumulating_two_half_batches_matches_one_full_micro_batch(model_dir: Path) -> None:
    """ZeRO-2 with 2 accumulation steps of 2 rows equals ZeRO-0 with 1 step of 4 rows.

    The two halves hold equal token counts, so the mean of their token-means is the full
    batch's token-mean: the gradients (and so the updates) agree.
    """
    accumulating = PolicyTrainer(str(model_dir), lr=1e-3, zero_stage=2, micro_batch_size=2, grad_accum_steps=2)
    single = PolicyTrainer(str(model_dir), lr=1e-3, zero_stage=0, micro_batch_size=4, grad_accum_steps=1)
    full = _on_policy(single, _batch(seed=3, rows=4))
    # rows 0+3 and 1+2 have the same number of response tokens (3+9 = 5+7)
    halves = [{key: value[list(rows)] for key, value in full.items()} for rows in ((0, 3), (1, 2))]
    assert halves[0]["response_mask"].sum() == halves[1]["response_mask"].sum()

    with pytest.raises(RuntimeError, match="after 0 micro-batches"):
        accumulating.optimizer_step()
    for half in halves:
        accumulating.forward_backward(half)
    with pytest.raises(RuntimeError, match="call optimizer_step"):
        accumulating.forward_backward(halves[0])
    accumulated_step = accumulating.optimizer_step()
    single.forward_backward(full)
    single_step = single.optimizer_step()

    assert accumulated_step["grad_norm"] == pytest.approx(single_step["grad_norm"], rel=1e-4)
    # Adam's first update is ~lr * sign(grad): where a gradient is ~1e-9, float rounding in the
    # two reduction orders shows as a few 1e-6, so compare against 1% of the 1e-3 step.
    single_weights = dict(single.named_weights())
    for name, tensor in accumulating.named_weights():
        assert torch.allclose(tensor, single_weights[name], rtol=0, atol=1e-5), name
