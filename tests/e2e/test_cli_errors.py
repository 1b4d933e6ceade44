"""Bad input gives one clear error line and a non-zero exit, fast, never a traceback wall."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def run_cli(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    tic = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - tic


@pytest.mark.parametrize(
    "args, fragment, limit_s",
    [
        (["train", "configs/tiny.yaml", "rollout.gruop_size=2"], "did you mean 'rollout.group_size'", 2),
        (["train", "configs/tiny.yaml", "trainer.lr=fast"], "trainer.lr", 2),
        (["config", "show", "configs/missing.yaml"], "configs/missing.yaml", 2),
        (["train", "configs/tiny.yaml", "model.path=no/such/folder"], "no/such/folder", 10),
        (["train", "configs/tiny.yaml", "model.path=configs"], "config.json", 10),
        (["train", "configs/tiny.yaml", "store.url=redis://127.0.0.1:9", "store.timeout_s=2"], "127.0.0.1:9", 10),
    ],
)
def test_bad_input_is_one_clear_line(args, fragment, limit_s, tmp_path):
    if args[0] == "train":
        args = [*args, f"run.dir={tmp_path / 'run'}"]  # nothing lands in the checkout
    proc, seconds = run_cli(*args)
    assert proc.returncode != 0
    assert seconds < limit_s  # config errors come before any heavy import
    errors = [line for line in proc.stderr.splitlines() if line.startswith("asyncrl: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_config_show_are_fast():
    proc, seconds = run_cli("--help")
    assert proc.returncode == 0 and "asyncrl train" in proc.stdout and seconds < 2
    proc, seconds = run_cli("config", "show", "configs/tiny.yaml", "run.steps=9")
    assert proc.returncode == 0 and "steps: 9" in proc.stdout and seconds < 2


def test_prompt_file_with_a_missing_field_is_one_clear_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    proc, seconds = run_cli(
        "train", "configs/tiny.yaml", "data.kind=jsonl", f"data.path={data}", f"run.dir={tmp_path / 'run'}"
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("asyncrl: error:")]
    assert proc.returncode == 2 and seconds < 10
    assert len(errors) == 1 and "data.prompt_field" in errors[0] and "question" in errors[0], proc.stderr
