"""run.wandb: step records go to W&B when wandb is installed; without it, a clear error before anything starts.

wandb is not installed in this environment (and must not be), so the logging path runs against a stand-in
``wandb`` module that records calls: the one fake here, for a package we cannot have.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from asyncrl.config import ConfigError, RunConfig
from asyncrl.metrics import RunWriter

ROOT = Path(__file__).parents[2]
needs_no_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")


@needs_no_wandb
def test_run_wandb_without_the_package_is_one_clear_line_before_the_run_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "train", "configs/tiny.yaml", "run.wandb=true", f"run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("asyncrl: error:")]
    assert len(errors) == 1 and "run.wandb=true needs the wandb package" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # refused at validation: no folder, no store, no Ray


@needs_no_wandb
def test_the_config_and_the_writer_refuse_wandb_without_the_package(tmp_path):
    with pytest.raises(ConfigError, match="run.wandb=true needs the wandb package"):
        RunConfig(wandb=True)
    assert RunConfig(wandb=False).wandb is False  # the default needs nothing
    with pytest.raises(ConfigError, match="pip install wandb"):
        RunWriter(tmp_path, wandb={"project": "p", "name": "n", "config": {}})


def test_step_records_are_logged_to_wandb_when_it_is_there(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class StandInRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return StandInRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    record = {"step": 3, "reward_mean": 0.5, "entropy": 1.25, "reward_failed_by/RewardTimeout": 2, "hist": {"0": 4}}
    with RunWriter(tmp_path, wandb={"project": "asyncrl", "name": "tiny", "config": {"run": {"steps": 3}}}) as writer:
        writer.log_step(record)
    assert calls[0] == (
        "init",
        {"dir": str(tmp_path), "project": "asyncrl", "name": "tiny", "config": {"run": {"steps": 3}}},
    )
    assert calls[1] == ("log", {"reward_mean": 0.5, "entropy": 1.25, "reward_failed_by/RewardTimeout": 2}, 3)
    assert calls[2:] == [("finish",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record  # the same record, in full
