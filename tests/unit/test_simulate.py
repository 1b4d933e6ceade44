"""The discrete-event model on cases worked by hand, its invariants, and calibration recovering known costs."""

import dataclasses
import json

import pytest

from asyncrl.config import load_config, to_yaml
from asyncrl.simulate import _Pipeline, calibrate, measure, report, simulate, splits

# One prompt of 2 samples per step, 10 tokens each; a decode step costs 10 ms whatever the batch
# (engine_seq_share=0), so a group takes 0.1 s; training 20 tokens at 200 tokens/s takes 0.1 s.
HAND = [
    "trainer.prompts_per_step=1", "trainer.micro_batch_size=2", "rollout.group_size=2", "rollout.max_new_tokens=10",
    "simulate.engine_step_s=0.01", "simulate.engine_seq_share=0", "simulate.train_tokens_per_s=200",
    "simulate.admission_poll_s=0", "simulate.steps=20",
]  # fmt: skip


def test_synchronous_step_is_generation_plus_training():
    result = simulate(load_config(None, HAND), max_staleness=0)
    assert result.step_seconds == pytest.approx(0.2)
    assert result.samples_per_s == pytest.approx(10.0)
    assert (result.staleness_mean, result.staleness_max, result.dropped_groups) == (0.0, 0, 0)


def test_one_step_of_staleness_overlaps_them_exactly():
    """Equal rates and free sync: generation of group n+1 hides behind training of group n: 2x, staleness 1."""
    result = simulate(load_config(None, HAND), max_staleness=1)
    assert result.step_seconds == pytest.approx(0.1)
    assert result.samples_per_s == pytest.approx(20.0)
    assert result.staleness_max == 1 and result.trainer_idle == pytest.approx(0.0, abs=1e-9)


def test_sync_cost_comes_from_the_link_bandwidth():
    cfg = load_config(None, [*HAND, "simulate.model_gb=1", "simulate.link_gbps=10", "simulate.sync_latency_s=0.05"])
    assert simulate(cfg, max_staleness=0).step_seconds == pytest.approx(0.2 + 0.1 + 0.05)


def test_the_slower_stage_bounds_the_asynchronous_step():
    cfg = load_config(None, [*HAND, "simulate.train_tokens_per_s=50"])  # training 0.4 s, generation 0.1 s
    assert simulate(cfg, max_staleness=0).step_seconds == pytest.approx(0.5)
    assert simulate(cfg, max_staleness=2).step_seconds == pytest.approx(0.4)


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_no_trained_group_is_over_the_bound_with_long_tails(max_staleness):
    cfg = load_config(
        None,
        ["rollout.max_new_tokens=512", "simulate.response_length=lognormal", "simulate.length_median=60",
         "simulate.length_sigma=1.2", "rollout.num_workers=3", "trainer.prompts_per_step=8", "simulate.steps=30"],
    )  # fmt: skip
    result = simulate(cfg, max_staleness=max_staleness)
    assert result.staleness_max <= max_staleness
    assert 0 <= result.trainer_idle <= 1 and 0 <= result.rollout_idle <= 1


def test_pool_splits_keep_the_accelerators():
    cfg = load_config("configs/gpu/qwen2.5-7b-64gpu.yaml", ["simulate.rollout_share_sweep=[0.25,0.75]"])
    assert splits(cfg) == [(48, [("rollout", 16)]), (16, [("rollout", 48)])]


def test_report_lists_every_sweep_point():
    text = report(load_config(None, [*HAND, "simulate.staleness_sweep=[0,1]"]))
    assert "2.00x" in text and text.count("\n") >= 4


def test_calibration_recovers_the_engine_cost_of_a_run(tmp_path):
    """A 'run' written by the model itself with a known engine_step_s: calibration finds it again."""
    truth = load_config(None, ["simulate.engine_step_s=0.02", "simulate.steps=8", "scheduler.max_staleness=0"])
    pipeline = _Pipeline(truth, 0, 1, [("rollout", 1)])
    pipeline.run()
    samples = truth.samples_per_step
    length = truth.rollout.max_new_tokens
    records = [
        {
            "step": i + 1, "samples_trained": samples, "response_tokens_mean": length,
            "train_tokens_per_s": s["tokens"] / s["busy"], "trainer_wait_seconds": s["wait"],
            "sync_seconds": 0.0, "step_seconds": s["seconds"],
        }
        for i, s in enumerate(pipeline.step_log)
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.yaml").write_text(to_yaml(truth))
    measured = measure(tmp_path)
    sim = calibrate(dataclasses.replace(truth.simulate, engine_step_s=1.0), [measured])
    assert sim.engine_step_s == pytest.approx(0.02, rel=0.02)
    assert sim.train_tokens_per_s == pytest.approx(truth.simulate.train_tokens_per_s, rel=1e-6)
