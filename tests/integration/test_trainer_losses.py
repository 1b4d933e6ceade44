"""PolicyTrainer with losses by name on real DeepSpeed engines (gloo, CPU): decoupled PPO's proximal pass, the KL term.

Shares the cost profile of test_trainer.py: the first DeepSpeed start on a machine compiles a
C++ op; later starts take a few seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from asyncrl.algorithms.loss import LossConfig  # noqa: E402
from asyncrl.models import build_tiny_model  # noqa: E402
from asyncrl.types import TRAJECTORY_SCHEMA, table_from_rows  # noqa: E402
from trainers.batch import collate  # noqa: E402
from trainers.policy import PolicyTrainer  # noqa: E402

# Eval (no-grad) and train forwards of the same weights agree to float32 rounding.
FORWARD_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2") / "model", seed=0)


def _batch(rows: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    table_rows = []
    for index in range(rows):
        response = torch.randint(1, 400, (3 + index,), generator=generator).tolist()
        table_rows.append(
            {
                "sample_id": f"s{index}",
                "prompt_id": "p",
                "group_id": "p",
                "prompt_ids": torch.randint(1, 400, (4,), generator=generator).tolist(),
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
    return collate(table_from_rows(table_rows, TRAJECTORY_SCHEMA), pad_id=0)


def _sampled_three_times_less_likely(trainer: PolicyTrainer) -> dict[str, torch.Tensor]:
    """Behaviour log-probs ln 3 below the trainer's own, advantage +1 on every response."""
    batch = _batch()
    mask = batch["response_mask"]
    behavior = (trainer.logprobs(batch) - math.log(3.0)) * mask
    return {**batch, "behavior_logprobs": behavior, "advantages": torch.ones(len(mask))}


def test_decoupled_ppo_clips_against_the_recomputed_proximal_policy(model_dir: Path) -> None:
    decoupled = PolicyTrainer(
        str(model_dir), lr=1e-3, zero_stage=0, micro_batch_size=4, loss="decoupled_ppo", loss_config=LossConfig()
    )
    coupled = PolicyTrainer(str(model_dir), lr=1e-3, zero_stage=0, micro_batch_size=4)
    batch = _sampled_three_times_less_likely(decoupled)

    stats = decoupled.forward_backward(batch)
    step = decoupled.optimizer_step()

    # the proximal pass gives ratio 1 to the current weights; the weight 3 is truncated at 2:
    # loss = -A * min(3, 2) = -2 on every token
    assert stats["proximal_ratio_mean"] == pytest.approx(1.0, abs=FORWARD_TOLERANCE)
    assert stats["loss"] == pytest.approx(-2.0, abs=FORWARD_TOLERANCE)
    assert stats["is_truncated_fraction"] == 1.0 and stats["clip_fraction"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(3.0, rel=FORWARD_TOLERANCE)
    assert step["grad_norm"] > 0

    # ppo_clip anchors the clip at the sampler: ratio 3 > 1.2 with A > 0, every token clipped
    stats = coupled.forward_backward(batch)
    step = coupled.optimizer_step()
    assert stats["loss"] == pytest.approx(-1.2, abs=FORWARD_TOLERANCE)
    assert stats["clip_fraction"] == 1.0
    assert step["grad_norm"] == 0.0


def test_kl_to_the_reference_applies_only_when_the_batch_has_ref_logprobs(model_dir: Path) -> None:
    trainer = PolicyTrainer(
        str(model_dir), micro_batch_size=4, zero_stage=0, loss_config=LossConfig(kl_coef=1.0, kl_estimator="k1")
    )
    batch = _batch()
    mask = batch["response_mask"]
    on_policy = {**batch, "behavior_logprobs": trainer.logprobs(batch), "advantages": torch.zeros(len(mask))}

    without = trainer.forward_backward(on_policy)
    trainer.optimizer_step()
    with_ref = trainer.forward_backward({**on_policy, "ref_logprobs": (on_policy["behavior_logprobs"] - 0.5) * mask})
    trainer.optimizer_step()

    # advantage 0 leaves only the KL: k1 = logprobs - ref = 0.5 on every token (weights unchanged:
    # the first step had zero loss and zero gradient)
    assert without["loss"] == 0.0 and "kl_ref" not in without
    assert with_ref["kl_ref"] == pytest.approx(0.5, abs=FORWARD_TOLERANCE)
    assert with_ref["loss"] == pytest.approx(0.5, abs=FORWARD_TOLERANCE)
