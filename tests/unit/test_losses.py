"""Policy losses, loss aggregations and KL estimators against values worked by hand.

Most cases set ``behavior_logprobs`` to 0 and ``logprobs`` to ``log(ratio)``, so each token's
ratio is the number written in the test. With token-mean aggregation over ``N`` tokens the
gradient of a token where ``-ratio * A`` is the active term is ``-A * ratio / N`` (d ratio /
d logprob = ratio); where a clipped term is active it is 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from asyncrl.algorithms.aggregation import (
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from asyncrl.algorithms.decoupled_ppo import decoupled_ppo
from asyncrl.algorithms.kl import kl_k1, kl_k2, kl_k3
from asyncrl.algorithms.loss import LossConfig, LossInputs
from asyncrl.algorithms.ppo_clip import ppo_clip, ppo_clip_loss
from asyncrl.algorithms.ratio_mask import ratio_mask
from asyncrl.algorithms.registry import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PROXIMAL_LOSSES,
    get_aggregation,
    get_kl_estimator,
    get_policy_loss,
)
from asyncrl.algorithms.tis import truncated_is


def _inputs(ratios: list[float], advantages: list[float], **extra) -> tuple[LossInputs, torch.Tensor]:
    """One sample whose tokens have these ratios to a behaviour policy at log-prob 0."""
    logprobs = torch.tensor([ratios]).log().requires_grad_(True)
    inputs = LossInputs(
        logprobs=logprobs,
        behavior_logprobs=torch.zeros(1, len(ratios)),
        advantages=torch.tensor([advantages]),
        mask=torch.ones(1, len(ratios)),
        **extra,
    )
    return inputs, logprobs


# --- PPO-clip -------------------------------------------------------------------------------------


def test_ppo_clip_asymmetric_clip_higher_by_hand() -> None:
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]
    inputs, logprobs = _inputs([1.3, 1.25, 0.75, 0.85], [1.0, 1.0, -1.0, -1.0])

    loss, metrics = ppo_clip(inputs, LossConfig(clip_eps_low=0.2, clip_eps_high=0.28))
    loss.backward()

    # 1.3 > 1.28 with A > 0: clipped, term -1.28, grad 0
    # 1.25 inside with A > 0: term -1.25, grad -1 * 1.25 / 4 (a symmetric 0.2 would clip it)
    # 0.75 < 0.8 with A < 0: clipped, term -(0.8 * -1) = 0.8, grad 0
    # 0.85 inside with A < 0: term 0.85, grad 0.85 / 4
    # loss (-1.28 - 1.25 + 0.8 + 0.85) / 4 = -0.88 / 4 = -0.22
    assert loss.item() == pytest.approx(-0.22)
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -1.25 / 4, 0.0, 0.85 / 4])
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx((1.3 + 1.25 + 0.75 + 0.85) / 4)
    # approx_kl = mean(behaviour - current) = -(ln 1.3 + ln 1.25 + ln 0.75 + ln 0.85) / 4 = -0.008827
    assert metrics["approx_kl"] == pytest.approx(-0.008827, abs=1e-6)

    symmetric, _ = ppo_clip(_inputs([1.3, 1.25, 0.75, 0.85], [1.0, 1.0, -1.0, -1.0])[0], LossConfig())
    # symmetric 0.2 clips 1.25 at 1.2 and 1.3 at 1.2: (-1.2 - 1.2 + 0.8 + 0.85) / 4 = -0.1875
    assert symmetric.item() == pytest.approx(-0.1875)


def test_ppo_clip_asymmetric_low_side_by_hand() -> None:
    # clip range [1 - 0.1, 1 + 0.2] = [0.9, 1.2]
    inputs, logprobs = _inputs([0.85, 0.95], [-1.0, -1.0])

    loss, metrics = ppo_clip(inputs, LossConfig(clip_eps_low=0.1, clip_eps_high=0.2))
    loss.backward()

    # 0.85 < 0.9 with A < 0: clipped, term 0.9, grad 0; 0.95 inside: term 0.95, grad 0.95 / 2
    assert loss.item() == pytest.approx((0.9 + 0.95) / 2)
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 0.95 / 2])
    assert metrics["clip_fraction"] == pytest.approx(0.5)


def test_ppo_clip_clips_at_both_sides_only_where_the_bound_binds() -> None:
    # above 1 + eps with A > 0 and below 1 - eps with A < 0 are clipped; the mirrored cases
    # (above with A < 0, below with A > 0) keep the unclipped, pessimistic term and its gradient
    inputs, logprobs = _inputs([1.5, 0.5, 1.5, 0.5], [1.0, -1.0, -1.0, 1.0])

    loss, metrics = ppo_clip(inputs, LossConfig())
    loss.backward()

    # terms: -1.2, -(0.8 * -1) = 0.8, -(1.5 * -1) = 1.5, -0.5 -> (-1.2 + 0.8 + 1.5 - 0.5) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15)
    # grads: 0, 0, -(-1) * 1.5 / 4, -(1) * 0.5 / 4
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 0.0, 1.5 / 4, -0.5 / 4])
    assert metrics["clip_fraction"] == pytest.approx(0.5)


def test_ppo_dual_clip_caps_the_loss_of_negative_advantages() -> None:
    inputs, logprobs = _inputs([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])

    loss, metrics = ppo_clip(inputs, LossConfig(dual_clip=3.0))
    loss.backward()

    # ratio 5, A = -1: plain term -min(-5, -1.2) = 5, capped at 3 * |A| = 3, grad 0
    # ratio 2, A = -1: term 2 < 3, grad -A * ratio / 3 = 2 / 3
    # ratio 5, A = +1: the ordinary clip, term -1.2, grad 0 (dual clip only acts on A < 0)
    # loss (3 + 2 - 1.2) / 3 = 1.266667
    assert loss.item() == pytest.approx(3.8 / 3)
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 2 / 3, 0.0])
    assert metrics["dual_clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)

    plain, plain_metrics = ppo_clip(_inputs([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])[0], LossConfig())
    assert plain.item() == pytest.approx((5 + 2 - 1.2) / 3)
    assert "dual_clip_fraction" not in plain_metrics


def test_ppo_clip_defaults_match_the_original_formula_bit_for_bit() -> None:
    """grpo + ppo_clip at symmetric 0.2 and token mean is the loss the trainer had before the registry."""
    generator = torch.Generator().manual_seed(0)
    behavior = -torch.rand(3, 7, generator=generator) * 3
    current = (behavior + torch.randn(3, 7, generator=generator) * 0.3).requires_grad_(True)
    reference_copy = current.detach().clone().requires_grad_(True)
    advantages = torch.randn(3, generator=generator)
    mask = (torch.rand(3, 7, generator=generator) > 0.3).float()

    loss, _ = get_policy_loss("ppo_clip")(LossInputs(current, behavior, advantages, mask), LossConfig())
    loss.backward()

    # the pre-registry implementation, verbatim
    ratio = torch.exp((reference_copy - behavior) * mask)
    unclipped = ratio * advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2) * advantages.unsqueeze(-1)
    original = (-torch.minimum(unclipped, clipped) * mask).sum() / mask.sum().clamp(min=1.0)
    original.backward()

    assert torch.equal(loss, original)
    assert torch.equal(current.grad, reference_copy.grad)
    legacy, _ = ppo_clip_loss(current.detach(), behavior, advantages, mask, clip_eps=0.2)
    assert torch.equal(legacy, original.detach())


# --- decoupled PPO ----------------------------------------------------------------------------------


def _decoupled_batch() -> tuple[LossInputs, torch.Tensor]:
    # behaviour log-prob 0 everywhere; weight w = proximal / behaviour, ratio r = current / proximal
    weights = [1.5, 0.5, 4.0]
    ratios = [1.0, 1.5, 0.9]
    proximal = torch.tensor([[math.log(w) for w in weights] + [-50.0]])  # the last token is padding
    current = torch.tensor([[math.log(w * r) for w, r in zip(weights, ratios, strict=True)] + [80.0]])
    current.requires_grad_(True)
    inputs = LossInputs(
        logprobs=current,
        behavior_logprobs=torch.zeros(1, 4),
        advantages=torch.tensor([[1.0, 1.0, -1.0, 1.0]]),
        mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        proximal_logprobs=proximal,
    )
    return inputs, current


def test_decoupled_ppo_by_hand() -> None:
    inputs, current = _decoupled_batch()

    loss, metrics = decoupled_ppo(inputs, LossConfig(tis_cap=2.0))
    loss.backward()

    # t0: w 1.5, r 1.0, A  1: term -1 * 1.5 = -1.5, grad -A * r * w / 3 = -0.5
    # t1: w 0.5, r 1.5, A  1: r clipped at 1.2: -1.2 * 0.5 = -0.6, grad 0
    # t2: w 4 truncated to 2, r 0.9 (inside), A -1: 0.9 * 2 = 1.8, grad 0.9 * 2 / 3 = 0.6
    # loss (-1.5 - 0.6 + 1.8) / 3 = -0.1
    assert loss.item() == pytest.approx(-0.1)
    assert current.grad[0].tolist() == pytest.approx([-0.5, 0.0, 0.6, 0.0])
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["is_truncated_fraction"] == pytest.approx(1 / 3)
    assert metrics["is_weight_mean"] == pytest.approx((1.5 + 0.5 + 2.0) / 3)
    assert metrics["proximal_ratio_mean"] == pytest.approx((1.0 + 1.5 + 0.9) / 3)
    # against the behaviour policy the ratios are w * r = 1.5, 0.75, 3.6
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.75 + 3.6) / 3)
    assert metrics["approx_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.75) + math.log(3.6)) / 3)


def test_decoupled_ppo_clips_against_the_proximal_policy_not_the_sampler() -> None:
    inputs, current = _decoupled_batch()
    decoupled, _ = decoupled_ppo(inputs, LossConfig())
    decoupled.backward()
    decoupled_grad = current.grad[0, 0].item()

    inputs, current = _decoupled_batch()
    coupled, _ = ppo_clip(inputs, LossConfig())
    coupled.backward()

    # t0 is 1.5x the behaviour policy (ppo_clip clips it: grad 0) but at ratio 1 to the proximal one
    assert current.grad[0, 0].item() == 0.0
    assert decoupled_grad == pytest.approx(-0.5)


def test_decoupled_ppo_without_truncation_keeps_the_whole_weight() -> None:
    inputs, _ = _decoupled_batch()
    loss, metrics = decoupled_ppo(inputs, LossConfig(tis_cap=0.0))
    # t2 now weighs 4: (-1.5 - 0.6 + 0.9 * 4) / 3 = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert metrics["is_truncated_fraction"] == 0.0


def test_decoupled_ppo_requires_proximal_logprobs() -> None:
    inputs, _ = _inputs([1.0], [1.0])
    with pytest.raises(ValueError, match="decoupled_ppo needs proximal_logprobs"):
        decoupled_ppo(inputs, LossConfig())
    assert PROXIMAL_LOSSES == {"decoupled_ppo"}


# --- truncated importance sampling ------------------------------------------------------------------


def test_truncated_is_by_hand() -> None:
    inputs, logprobs = _inputs([3.0, 0.5, 1.5], [1.0, -1.0, 2.0])

    loss, metrics = truncated_is(inputs, LossConfig(tis_cap=2.0))
    loss.backward()

    # per token -A * min(ratio, 2), gradient the same times d log p:
    # t0: ratio 3 truncated to 2: -2; t1: 0.5: -(-1) * 0.5 = 0.5; t2: 1.5, A 2: -3
    # loss (-2 + 0.5 - 3) / 3 = -1.5; grads -2/3, 0.5/3, -3/3 (no clip: t2 is past 1.2 with A > 0)
    assert loss.item() == pytest.approx(-1.5)
    assert logprobs.grad[0].tolist() == pytest.approx([-2 / 3, 0.5 / 3, -1.0])
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)  # the truncated share
    assert metrics["ratio_mean"] == pytest.approx((3.0 + 0.5 + 1.5) / 3)


def test_truncated_is_with_cap_zero_is_plain_importance_sampling() -> None:
    inputs, logprobs = _inputs([3.0, 0.5, 1.5], [1.0, -1.0, 2.0])

    loss, metrics = truncated_is(inputs, LossConfig(tis_cap=0.0))
    loss.backward()

    # t0 keeps its weight 3: (-3 + 0.5 - 3) / 3
    assert loss.item() == pytest.approx(-5.5 / 3)
    assert logprobs.grad[0, 0].item() == pytest.approx(-1.0)
    assert metrics["clip_fraction"] == 0.0


# --- ratio-band masking ------------------------------------------------------------------------------


def test_ratio_mask_drops_tokens_outside_the_band_by_hand() -> None:
    inputs, logprobs = _inputs([0.4, 1.0, 1.1, 2.5], [1.0, 1.0, -1.0, 1.0])

    loss, metrics = ratio_mask(inputs, LossConfig(ratio_band_low=0.5, ratio_band_high=2.0))
    loss.backward()

    # 0.4 < 0.5 and 2.5 > 2: dropped (0, grad 0); 1.0 with A 1: -1, grad -1/4;
    # 1.1 with A -1: 1.1, grad 1.1/4. The normaliser stays the 4 response tokens:
    # loss (0 - 1 + 1.1 + 0) / 4 = 0.025 (dividing by the 2 kept tokens would give 0.05)
    assert loss.item() == pytest.approx(0.025)
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.25, 1.1 / 4, 0.0])
    assert metrics["masked_fraction"] == pytest.approx(0.5)
    # 2.5 would be clipped, but it is dropped, so no kept token is clipped
    assert metrics["clip_fraction"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx((0.4 + 1.0 + 1.1 + 2.5) / 4)

    # plain ppo_clip keeps the gradient of 0.4 with A > 0 (the min picks the unclipped term)
    inputs, logprobs = _inputs([0.4, 1.0, 1.1, 2.5], [1.0, 1.0, -1.0, 1.0])
    ppo_clip(inputs, LossConfig())[0].backward()
    assert logprobs.grad[0, 0].item() == pytest.approx(-0.4 / 4)


def test_ratio_mask_band_edges_are_kept() -> None:
    inputs, _ = _inputs([0.5, 2.0], [1.0, -1.0])
    _, metrics = ratio_mask(inputs, LossConfig(ratio_band_low=0.5, ratio_band_high=2.0))
    assert metrics["masked_fraction"] == 0.0


# --- aggregation ----------------------------------------------------------------------------------


def test_aggregations_by_hand() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])  # 9s are masked junk
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])

    # token mean: (1 + 2 + 3 + 4) / 4 tokens
    assert token_mean(per_token, mask).item() == pytest.approx(2.5)
    # sequence sums 6 and 4, averaged over the 2 rows with a token
    assert seq_mean_token_sum(per_token, mask).item() == pytest.approx(5.0)
    # sequence means 2 and 4, averaged over the 2 rows with a token
    assert seq_mean_token_mean(per_token, mask).item() == pytest.approx(3.0)
    # Dr. GRPO: token sum 10 over a constant B * max_response_len = 3 * 5
    assert seq_mean_token_sum_norm(per_token, mask, max_response_len=5).item() == pytest.approx(10 / 15)
    for name in LOSS_AGGREGATIONS:
        assert get_aggregation(name)(per_token, torch.zeros(3, 3), 5).item() == 0.0


def test_seq_mean_token_sum_norm_needs_the_length() -> None:
    with pytest.raises(ValueError, match="max_response_len >= 1, got 0"):
        seq_mean_token_sum_norm(torch.ones(1, 2), torch.ones(1, 2), max_response_len=0)


@pytest.mark.parametrize(
    "loss_agg, expected",
    [
        # at ratio 1 the per-token loss is -A: row 0 has 3 tokens of -2, row 1 one token of +1
        ("token_mean", (-6 + 1) / 4),
        ("seq_mean_token_sum", (-6 + 1) / 2),
        ("seq_mean_token_mean", (-2 + 1) / 2),
        ("seq_mean_token_sum_norm", (-6 + 1) / (2 * 4)),
    ],
)
def test_a_loss_uses_the_configured_aggregation(loss_agg: str, expected: float) -> None:
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    inputs = LossInputs(
        logprobs=logprobs,
        behavior_logprobs=torch.full((2, 3), -1.0),
        advantages=torch.tensor([2.0, -1.0]),
        mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
    )
    loss, _ = ppo_clip(inputs, LossConfig(loss_agg=loss_agg, max_response_len=4))
    assert loss.item() == pytest.approx(expected)


# --- KL to the reference ------------------------------------------------------------------------------


def test_kl_estimators_by_hand() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, 70.0]])
    ref = torch.tensor([[-1.5, -2.0, -90.0]])  # the last position is masked junk
    mask = torch.tensor([[1.0, 1.0, 0.0]])

    # d = ref - logprobs = -0.5 at t0, 0 at t1
    assert kl_k1(logprobs, ref, mask)[0].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert kl_k2(logprobs, ref, mask)[0].tolist() == pytest.approx([0.125, 0.0, 0.0])
    # exp(-0.5) + 0.5 - 1 = 0.106531
    assert kl_k3(logprobs, ref, mask)[0].tolist() == pytest.approx([0.106531, 0.0, 0.0], abs=1e-6)


def test_kl_term_is_added_only_with_reference_logprobs() -> None:
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    base = dict(behavior_logprobs=torch.tensor([[-1.0, -2.0]]), advantages=torch.zeros(1), mask=torch.ones(1, 2))
    cfg = LossConfig(kl_coef=0.1, kl_estimator="k3")

    loss, metrics = ppo_clip(LossInputs(logprobs=logprobs, ref_logprobs=torch.tensor([[-1.5, -2.0]]), **base), cfg)
    loss.backward()

    # A = 0, so only the KL remains: 0.1 * (0.106531 + 0) / 2 = 0.0053265
    assert loss.item() == pytest.approx(0.0053265, abs=1e-7)
    assert metrics["kl_ref"] == pytest.approx(0.106531 / 2, abs=1e-6)
    # d k3 / d logprob = 1 - exp(ref - logprob) = 1 - exp(-0.5) = 0.393469, times 0.1 / 2
    assert logprobs.grad[0].tolist() == pytest.approx([0.0196735, 0.0], abs=1e-6)

    # no reference log-probs in the batch (there is no reference model stage yet): no term
    loss, metrics = ppo_clip(LossInputs(logprobs=logprobs, **base), cfg)
    assert loss.item() == 0.0 and "kl_ref" not in metrics
    # kl_coef 0 is off even with a reference
    loss, metrics = ppo_clip(LossInputs(logprobs=logprobs, ref_logprobs=torch.zeros(1, 2), **base), LossConfig())
    assert loss.item() == 0.0 and "kl_ref" not in metrics


@pytest.mark.parametrize("estimator, expected", [("k1", 0.5 / 2), ("k2", 0.125 / 2), ("k3", 0.106531 / 2)])
def test_kl_estimator_is_chosen_by_name(estimator: str, expected: float) -> None:
    inputs = LossInputs(
        logprobs=torch.tensor([[-1.0, -2.0]]),
        behavior_logprobs=torch.tensor([[-1.0, -2.0]]),
        advantages=torch.zeros(1),
        mask=torch.ones(1, 2),
        ref_logprobs=torch.tensor([[-1.5, -2.0]]),
    )
    _, metrics = ppo_clip(inputs, LossConfig(kl_coef=1.0, kl_estimator=estimator))
    assert metrics["kl_ref"] == pytest.approx(expected, abs=1e-6)


# --- the contract every registered loss keeps ---------------------------------------------------------


def _contract_inputs(ratio: float = 1.0) -> tuple[LossInputs, torch.Tensor]:
    behavior = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    junk = torch.tensor([[0.0, 0.0, 90.0], [0.0, -70.0, 85.0]])  # padding may hold anything
    logprobs = (behavior + math.log(ratio) * mask + junk).requires_grad_(True)
    inputs = LossInputs(
        logprobs=logprobs,
        behavior_logprobs=behavior,
        advantages=torch.tensor([2.0, -1.0]),
        mask=mask,
        proximal_logprobs=logprobs.detach().clone(),
    )
    return inputs, logprobs


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_at_ratio_one_is_minus_the_mean_advantage(name: str) -> None:
    inputs, logprobs = _contract_inputs()

    loss, metrics = get_policy_loss(name)(inputs, LossConfig())
    loss.backward()

    # three tokens: two with A = 2, one with A = -1 -> -(2 + 2 - 1) / 3 = -1
    assert loss.dim() == 0 and loss.item() == pytest.approx(-1.0)
    assert torch.allclose(logprobs.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))
    assert {"clip_fraction", "ratio_mean", "approx_kl"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics["clip_fraction"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["approx_kl"] == pytest.approx(0.0)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_ignores_padding_and_is_zero_without_tokens(name: str) -> None:
    inputs, logprobs = _contract_inputs(ratio=1.1)
    loss, _ = get_policy_loss(name)(inputs, LossConfig())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2].item() == 0.0 and logprobs.grad[1, 1:].tolist() == [0.0, 0.0]

    empty = LossInputs(
        logprobs=torch.zeros(2, 3, requires_grad=True),
        behavior_logprobs=torch.zeros(2, 3),
        advantages=torch.ones(2),
        mask=torch.zeros(2, 3),
        proximal_logprobs=torch.zeros(2, 3),
    )
    loss, metrics = get_policy_loss(name)(empty, LossConfig())
    assert loss.item() == 0.0 and metrics["clip_fraction"] == 0.0


def test_registry_resolves_every_loss_and_rejects_an_unknown_name() -> None:
    assert get_policy_loss("ppo_clip") is ppo_clip
    assert get_policy_loss("decoupled_ppo") is decoupled_ppo
    assert get_policy_loss("tis") is truncated_is
    assert get_policy_loss("ratio_mask") is ratio_mask
    with pytest.raises(
        ValueError, match="unknown policy loss 'grpo'; allowed: ppo_clip, decoupled_ppo, tis, ratio_mask"
    ):
        get_policy_loss("grpo")
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'; allowed: token_mean, seq_mean_token_sum"):
        get_aggregation("mean")
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; allowed: k1, k2, k3"):
        get_kl_estimator("k4")
