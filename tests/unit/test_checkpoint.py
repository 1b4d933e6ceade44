"""Checkpoint folders: atomic publication, manifests with checksums, pruning, damage named by file."""

from __future__ import annotations

import json
from collections import Counter, deque
from pathlib import Path

import pytest

from asyncrl.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    list_checkpoints,
    load_run_state,
    save_checkpoint,
    scheduler_state,
    verify,
)
from asyncrl.cli import main
from asyncrl.config import SchedulerConfig
from asyncrl.scheduler import Scheduler


def _fill(folder: Path) -> None:
    (folder / "engine").mkdir()
    (folder / "engine" / "model_states.pt").write_bytes(bytes(range(256)) * 64)
    (folder / "config.yaml").write_text("run:\n  name: t\n")


def _save(run_dir: Path, step: int, keep: int = 2) -> Path:
    return save_checkpoint(run_dir, step, step, {"scheduler": {"issued": 3 * step}}, _fill, keep=keep)


def test_a_checkpoint_lists_every_file_with_its_size_and_checksum(tmp_path):
    folder = _save(tmp_path, 4)
    assert folder == tmp_path / CHECKPOINTS / "step-000004"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.yaml", "engine/model_states.pt", "run_state.json"]
    assert manifest["files"]["engine/model_states.pt"]["bytes"] == 256 * 64
    assert verify(folder) == []
    assert load_run_state(folder) == {"step": 4, "version": 4, "scheduler": {"issued": 12}}


def test_only_the_newest_checkpoints_are_kept_and_a_partial_one_is_never_listed(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step, keep=2)
    (tmp_path / CHECKPOINTS / ".tmp-step-000008").mkdir()  # a save that died half-way
    assert [info.step for info in list_checkpoints(tmp_path)] == [4, 6]
    _save(tmp_path, 8, keep=2)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step-000006", "step-000008"]


def test_a_failing_save_leaves_the_previous_checkpoint_the_newest(tmp_path):
    _save(tmp_path, 2)

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, 4, {}, broken, keep=2)
    assert [info.step for info in list_checkpoints(tmp_path)] == [2]


def test_a_truncated_or_altered_file_is_named(tmp_path):
    folder = _save(tmp_path, 2)
    weights = folder / "engine" / "model_states.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    (folder / "config.yaml").write_text("run:\n  name: u\n")  # same size, other bytes
    problems = verify(folder)
    assert any(str(weights) in p and "truncated" in p for p in problems), problems
    assert any("config.yaml" in p and "checksum" in p for p in problems), problems
    with pytest.raises(CheckpointError, match="model_states.pt"):
        load_run_state(folder)


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    folder = _save(tmp_path, 2)
    (folder / "manifest.json").unlink()
    assert "manifest.json is missing" in verify(folder)[0]
    assert list_checkpoints(tmp_path) == []


def test_scheduler_state_is_plain_json():
    scheduler = Scheduler(SchedulerConfig(max_staleness=1), prompts_per_step=2)
    scheduler.take(3)
    scheduler.requeued = deque([7])
    scheduler.staleness_counts = Counter({0: 4, 1: 2})
    state = json.loads(json.dumps(scheduler_state(scheduler)))
    assert state["issued"] == 3 and state["next_prompt"] == 3
    assert state["requeued"] == [7] and state["staleness_counts"] == {"0": 4, "1": 2}
    assert "cfg" not in state


def test_ckpt_cli_lists_and_inspects(tmp_path, capsys):
    _save(tmp_path, 2)
    folder = _save(tmp_path, 4)
    assert main(["ckpt", "list", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["2", "4"]
    assert main(["ckpt", "inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "issued 12" in out and "all match" in out
    (folder / "engine" / "model_states.pt").write_bytes(b"")
    assert main(["ckpt", "inspect", str(folder)]) == 2
    assert "model_states.pt" in capsys.readouterr().err
    assert main(["ckpt", "inspect", str(tmp_path / "nope")]) == 2
