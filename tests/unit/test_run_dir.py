import pytest

from asyncrl.config import ConfigError
from asyncrl.metrics import prepare_run_dir


def test_fresh_folder_is_created(tmp_path):
    assert prepare_run_dir(tmp_path / "a" / "b", overwrite=False).is_dir()


def test_earlier_run_is_refused_then_replaced_without_touching_other_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="run.overwrite=true"):
        prepare_run_dir(tmp_path, overwrite=False)
    assert (tmp_path / "metrics.jsonl").exists()
    prepare_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_failed_start_are_replaced(tmp_path):
    (tmp_path / "config.yaml").write_text("old: 1\n")
    prepare_run_dir(tmp_path, overwrite=False)
    assert not (tmp_path / "config.yaml").exists()


def test_an_earlier_runs_checkpoints_are_refused_then_removed(tmp_path):
    """A new run must not prune or list another run's checkpoints as its own."""
    (tmp_path / "checkpoints" / "step-000020").mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoints"):
        prepare_run_dir(tmp_path, overwrite=False)
    prepare_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "checkpoints").exists()
