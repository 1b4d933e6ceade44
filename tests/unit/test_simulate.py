"""The discrete-event model on cases worked by hand, its invariants, and calibration recovering known costs."""

import dataclasses
import json

import pytest

from asyncrl.config import load_config, to_yaml
from asyncrl.simulate import _decode_deltas, _Pipeline, as_run, calibrate, measure, report, simulate, splits

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


@pytest.mark.parametrize(
    ("sync", "step_seconds"),
    [(["sync.mode=inflight"], 0.2), (["sync.mode=pause", "sync.transport=broadcast"], 0.3),
     (["sync.mode=pause", "sync.transport=object_store"], 0.2)],
)  # fmt: skip
def test_engines_decode_through_a_sync_unless_it_pauses_them(sync, step_seconds):
    """One group at a time taking 0.2 s, training 0.1 s, sync 0.1 s, k=1: decoding in flight hides the sync; a
    pausing (bucketed) sync takes it out of the engine's time. The object store transport never pauses engines."""
    slow = ["rollout.max_num_seqs=2", "simulate.engine_step_s=0.02", "simulate.sync_latency_s=0.1"]
    cfg = load_config(None, [*HAND, *slow, *sync])
    assert simulate(cfg, max_staleness=1).step_seconds == pytest.approx(step_seconds)


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


def test_the_trainers_handling_of_a_group_counts_as_its_wait_and_lengthens_the_step():
    result = simulate(load_config(None, [*HAND, "simulate.trainer_group_s=0.05"]), max_staleness=0)
    assert result.step_seconds == pytest.approx(0.25)
    assert result.trainer_wait_seconds == pytest.approx(0.15)  # generation, then handling: not forward/backward


def test_a_step_issues_its_prompts_before_the_first_poll_tick():
    """The controller issues first and then waits a poll tick: k=0 generation starts with the step, not a tick later."""
    cfg = load_config(None, [*HAND, "simulate.admission_poll_s=0.5"])
    assert simulate(cfg, max_staleness=0).step_seconds == pytest.approx(0.2)


def test_a_dropped_groups_slot_is_refilled_one_poll_after_the_drop_is_read():
    """Each poll issues, then reads the drops: the slot a drop frees is used by the next poll, not the one reading it."""
    pipeline = _Pipeline(load_config(None, HAND), 0, 1, [("rollout", 1)])
    pipeline._poll()
    assert pipeline.issued == 1
    pipeline.dropped = 1  # the trainer dropped that group
    pipeline._poll()
    assert pipeline.issued == 1
    pipeline._poll()
    assert pipeline.issued == 2


def test_a_group_may_take_the_last_free_slots_and_its_other_samples_wait():
    """max_num_seqs=3, groups of 2: the engine takes both groups of the step; three samples decode, one waits."""
    pipeline = _Pipeline(load_config(None, [*HAND, "trainer.prompts_per_step=2", "rollout.max_num_seqs=3"]), 0, 1,
                         [("rollout", 1)])  # fmt: skip
    pipeline._poll()
    engine = pipeline.engines[0]
    assert len(engine.running) == 2 and len(pipeline._active(engine)) == 3
    result = simulate(pipeline.cfg, max_staleness=0)  # the waiting sample decodes after the first three: 0.2 s
    assert result.step_seconds == pytest.approx(0.3)  # then the second group trains 0.1 s after the first


def test_a_burst_of_prompts_spreads_over_the_engines_with_room():
    """Each entry wakes a worker waiting on the stream: 4 groups over 2 idle engines go 2 and 2, not 4 and 0."""
    cfg = load_config(None, [*HAND, "trainer.prompts_per_step=4", "rollout.num_workers=2"])
    pipeline = _Pipeline(cfg, 0, 1, [("rollout", 2)])
    pipeline._poll()
    assert [len(engine.running) for engine in pipeline.engines] == [2, 2]


def test_the_simulated_decode_rate_is_tokens_per_busy_engine_second():
    # 2 sequences at 10 ms per decode step (engine_seq_share=0): 200 tokens per busy second, idle while training.
    result = simulate(load_config(None, HAND), max_staleness=0)
    assert result.decode_tokens_per_s == pytest.approx(200.0)
    assert result.rollout_idle == pytest.approx(0.5)


def _write_run(folder, cfg, wait_offset=0.0):
    """A 'run' written by the model itself: metrics.jsonl as the controller writes it (with ``wait_offset`` more
    trainer wait per step than the model had; a reward stage's counters at ``simulate.reward_s`` a group), and
    config.yaml."""
    pipeline = _Pipeline(cfg, cfg.scheduler.max_staleness, 1, [("rollout", 1)])
    pipeline.run()
    records = [
        {
            "step": i + 1, "samples_trained": cfg.samples_per_step, "response_tokens_mean": s["tokens"] / cfg.samples_per_step,
            "train_tokens_per_s": s["tokens"] / s["busy"], "trainer_wait_seconds": s["wait"] + wait_offset,
            "sync_seconds": 0.0, "step_seconds": s["seconds"] + wait_offset,
            "rollout_decode_by_worker": {"rollout-0": {"tokens": s["engine_tokens"], "busy_seconds": s["engine_busy"]}},
            "reward_stage_busy_s": (i + 1) * cfg.trainer.prompts_per_step * cfg.simulate.reward_s,
            "reward_stage_rows": (i + 1) * cfg.samples_per_step,
        }
        for i, s in enumerate(pipeline.step_log)
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_calibration_recovers_the_engine_cost_and_trainer_handling_of_a_run(tmp_path, max_staleness):
    """A 'run' written by the model with known costs: the fit finds them again, at k=0 (the trainer waits for the
    engine) and k=2 (it waits only on its own handling of each group), and predicts the run's samples/s."""
    truth = load_config(
        None,
        ["simulate.engine_step_s=0.02", "simulate.trainer_group_s=0.3", "simulate.steps=8",
         "simulate.train_tokens_per_s=500", f"scheduler.max_staleness={max_staleness}"],
    )  # fmt: skip
    measured = measure(_write_run(tmp_path, truth))
    fitted = calibrate(dataclasses.replace(truth.simulate, engine_step_s=1.0, trainer_group_s=0.0), [measured])
    assert fitted.notes == ()
    assert fitted.sim.engine_step_s == pytest.approx(0.02, rel=0.01)
    assert fitted.sim.train_tokens_per_s == pytest.approx(truth.simulate.train_tokens_per_s, rel=1e-6)
    assert fitted.sim.trainer_group_s == pytest.approx(0.3, rel=0.01)
    assert simulate(as_run(measured, fitted.sim)).samples_per_s == pytest.approx(measured.samples_per_s, rel=0.01)


def test_calibration_takes_the_stages_time_per_group_as_measured(tmp_path):
    """stages.*: the stages' busy seconds per group (their rows / group_size) become reward_s; the fit is left the
    trainer's own handling, which this run did not have."""
    truth = load_config(
        None, ["simulate.engine_step_s=0.02", "simulate.reward_s=0.25", "simulate.steps=8", "scheduler.max_staleness=0"]
    )
    measured = measure(_write_run(tmp_path, truth))
    assert measured.stage_group_s == pytest.approx(0.25)
    fitted = calibrate(dataclasses.replace(truth.simulate, reward_s=0.0), [measured])
    assert fitted.sim.reward_s == pytest.approx(0.25)
    assert fitted.sim.trainer_group_s == pytest.approx(0.0, abs=1e-3)
    assert simulate(as_run(measured, fitted.sim)).samples_per_s == pytest.approx(measured.samples_per_s, rel=0.01)


def test_a_fit_at_its_bound_is_reported(tmp_path):
    """A run that waited less than the model can with no handling at all: the fit ends at 0 and the report says so."""
    truth = load_config(None, ["simulate.engine_step_s=0.02", "simulate.steps=8", "scheduler.max_staleness=0"])
    measured = measure(_write_run(tmp_path, truth, wait_offset=-0.1))
    fitted = calibrate(truth.simulate, [measured])
    assert fitted.sim.trainer_group_s == 0.0
    assert any("trainer_group_s at its lower bound" in note for note in fitted.notes)
    text = report(load_config(None, ["simulate.steps=8", f"simulate.calibrate_from=[{tmp_path}]"]))
    assert "note: trainer_group_s at its lower bound" in text


def test_engine_decode_counters_survive_a_worker_restart():
    """Cumulative counters of a restarted worker start from zero again: its tokens after the restart still count."""
    records = [
        {"rollout_decode_by_worker": {"rollout-0": {"tokens": 100, "busy_seconds": 1.0}}},
        {"rollout_decode_by_worker": {"rollout-0": {"tokens": 150, "busy_seconds": 1.5}}},
        {"rollout_decode_by_worker": {"rollout-0": {"tokens": 30, "busy_seconds": 0.25}}},
    ]
    assert _decode_deltas(records) == (80, 0.75)


def test_calibration_needs_the_engines_decode_counters(tmp_path):
    truth = load_config(None, ["simulate.steps=4"])
    folder = _write_run(tmp_path, truth)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        del line["rollout_decode_by_worker"]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match="rollout_decode_by_worker"):
        measure(folder)
