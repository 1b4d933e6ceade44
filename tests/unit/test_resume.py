"""Resume planning without starting anything: the config compatibility check, the logs cut back to the
checkpoint, the scheduler's outstanding prompts, and `ckpt resume` refusing a bad checkpoint or change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncrl.checkpoint import CheckpointError, save_checkpoint, scheduler_state
from asyncrl.cli import main
from asyncrl.config import ConfigError, SchedulerConfig, load_config, to_yaml
from asyncrl.resume import check_compatible, plan_resume, truncate_run_logs
from asyncrl.scheduler import Scheduler

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def _checkpoint(run_dir: Path, step: int = 4, *overrides: str) -> Path:
    """A checkpoint of a tiny run at ``step`` with two prompts outstanding (no engine state: nothing loads it)."""
    cfg = load_config(TINY, [f"run.dir={run_dir}", "run.steps=8", *overrides])
    scheduler = Scheduler(cfg.scheduler, cfg.trainer.prompts_per_step)
    scheduler.take(scheduler.admissible())  # p0..p3
    scheduler.on_step(2, [0] * 8, [0, 1])
    scheduler.take(scheduler.admissible())  # p4, p5
    scheduler.on_step(2, [1] * 8, [2, 3])

    def fill(folder: Path) -> None:
        (folder / "config.yaml").write_text(to_yaml(cfg))
        (folder / "engine").mkdir()
        (folder / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 4096)

    state = {"scheduler": scheduler_state(scheduler)}
    return save_checkpoint(run_dir, step, step, state, fill, keep=2)


def test_outstanding_prompts_are_issued_minus_trained_minus_dropped():
    scheduler = Scheduler(SchedulerConfig(max_staleness=1, on_stale="regenerate"), prompts_per_step=2)
    assert scheduler.take(4) == [0, 1, 2, 3]
    scheduler.on_dropped([1])
    scheduler.on_step(2, [0] * 8, [0, 2])
    assert scheduler.outstanding == {3}
    assert scheduler.take(scheduler.admissible()) == [1, 4, 5]  # the dropped prompt again, then new ones
    assert scheduler.outstanding == {1, 3, 4, 5}


def test_a_restored_scheduler_issues_the_outstanding_prompts_first_and_counts_as_before():
    scheduler = Scheduler(SchedulerConfig(max_staleness=1, on_stale="regenerate"), prompts_per_step=2)
    scheduler.take(4)
    scheduler.on_dropped([3])
    scheduler.on_step(2, [0] * 8, [0, 2])
    state = json.loads(json.dumps(scheduler_state(scheduler)))
    assert state["outstanding"] == [1]
    restored = Scheduler.from_state(scheduler.cfg, 2, state)
    assert restored.admissible() == scheduler.admissible() + 1  # prompt 1 is no longer in flight
    assert restored.take(restored.admissible()) == [1, 3, 4, 5]  # outstanding, then re-queued, then the cursor
    assert (restored.version, restored.trained, restored.dropped, restored.issued) == (1, 2, 1, scheduler.issued + 3)
    assert restored.staleness_counts == {0: 8}


def test_prompts_whose_groups_the_checkpoint_kept_stay_in_flight_and_are_not_issued_again():
    scheduler = Scheduler(SchedulerConfig(max_staleness=2), prompts_per_step=2)
    scheduler.take(6)
    scheduler.on_step(2, [0] * 8, [0, 1])
    state = json.loads(json.dumps(scheduler_state(scheduler)))
    restored = Scheduler.from_state(scheduler.cfg, 2, state, kept=[3, 5, 9])  # 9: not outstanding, ignored
    assert restored.outstanding == {3, 5}
    assert restored.admissible() == scheduler.admissible() + 2  # only prompts 2 and 4 left the flight
    assert restored.take(restored.admissible()) == [2, 4, 6, 7]
    restored.on_step(2, [1] * 8, [3, 5])
    assert restored.outstanding == {2, 4, 6, 7}


def test_allowed_changes_pass_and_frozen_ones_are_named_with_the_reason():
    saved = load_config(TINY)
    check_compatible(saved, load_config(TINY, ["run.steps=20", "trainer.lr=3e-4", "scheduler.max_staleness=2"]))
    with pytest.raises(ConfigError, match=r"model.path cannot change on resume .*weights") as err:
        check_compatible(saved, load_config(TINY, ["model.path=other", "rollout.group_size=8"]))
    assert "rollout.group_size cannot change on resume (4 -> 8)" in str(err.value)
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size .*micro-batches"):
        check_compatible(saved, load_config(TINY, ["trainer.micro_batch_size=2"]))
    with pytest.raises(ConfigError, match=r"trainer.clip_eps cannot change .*only run.steps"):
        check_compatible(saved, load_config(TINY, ["trainer.clip_eps=0.3"]))


def _write_jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def test_logs_are_cut_back_to_the_checkpoint(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": s} for s in range(1, 6)], tail='{"step": 6, "lo')
    ledger = [{"sample_id": f"s{v}-{i}", "trained_at_version": v} for v in range(5) for i in range(2)]
    _write_jsonl(tmp_path / "ledger.jsonl", ledger)
    assert truncate_run_logs(tmp_path, step=4, version=4) == {"metrics.jsonl": 2, "ledger.jsonl": 2}
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    kept = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert sorted({row["trained_at_version"] for row in kept}) == [0, 1, 2, 3] and len(kept) == 8
    assert truncate_run_logs(tmp_path, step=4, version=4) == {"metrics.jsonl": 0, "ledger.jsonl": 0}  # idempotent


def test_a_damaged_line_inside_a_log_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl line 2"):
        truncate_run_logs(tmp_path, step=1, version=1)


def test_plan_continues_in_the_checkpoints_run_folder(tmp_path):
    checkpoint = _checkpoint(tmp_path / "run")
    cfg, resume = plan_resume(checkpoint, ["trainer.lr=5e-4"])
    assert resume.run_dir == (tmp_path / "run").resolve() and Path(cfg.run.dir) == resume.run_dir
    assert (resume.step, resume.version, cfg.trainer.lr, cfg.run.steps) == (4, 4, 5e-4, 8)
    assert resume.run_state["scheduler"]["outstanding"] == [4, 5]
    with pytest.raises(ConfigError, match=r"run.steps is 4 .* pass run.steps=N with N > 4"):
        plan_resume(checkpoint, ["run.steps=4"])


def test_resume_refuses_a_damaged_checkpoint_or_a_frozen_change_before_starting(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "run")
    assert main(["ckpt", "resume", str(checkpoint), "rollout.group_size=8"]) == 2
    assert "rollout.group_size cannot change on resume" in capsys.readouterr().err
    weights = checkpoint / "engine" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["ckpt", "resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "redis").exists()
