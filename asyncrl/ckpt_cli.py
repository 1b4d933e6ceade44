"""`asyncrl ckpt list|inspect|export-hf`: a run's checkpoints, whether each is intact, and the policy as a
Hugging Face folder (only export-hf imports torch)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from asyncrl.checkpoint import RUN_STATE, CheckpointError, list_checkpoints, read_groups, read_info, verify


def cmd_list(run_dir: Path) -> int:
    """One line per complete checkpoint: step, policy version, time written, size."""
    if not Path(run_dir).is_dir():
        print(f"asyncrl: error: no such run folder {run_dir}", file=sys.stderr)
        return 2
    found = list_checkpoints(run_dir)
    if not found:
        print(f"no checkpoints in {run_dir} (set run.checkpoint_every to write them)")
        return 0
    print(f"{'step':>6} {'version':>7}  {'written':19}  {'size':>9}  path")
    for info in found:
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
        print(f"{info.step:>6} {info.version:>7}  {written}  {_size(info.bytes):>9}  {info.path}")
    return 0


def cmd_inspect(folder: Path) -> int:
    """Step, version, what the run state counts, and every file checked against its checksum;
    exits 2 naming each damaged file."""
    try:
        info = read_info(folder)
    except CheckpointError as err:
        print(f"asyncrl: error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint {info.path}: step {info.step}, policy version {info.version}, {_size(info.bytes)}")
    problems = verify(folder)
    if not problems:
        state = json.loads((Path(folder) / RUN_STATE).read_text()).get("scheduler", {})
        counts = ", ".join(
            f"{key} {state[key]}" for key in ("issued", "trained", "dropped", "next_prompt") if key in state
        )
        print(f"scheduler: {counts}")
        groups = read_groups(folder)
        print(f"scored groups kept for the trainer: {len(groups)} ({sum(group.num_rows for group in groups)} samples)")
        print("files: all match their checksums")
        return 0
    for problem in problems:
        print(f"asyncrl: error: {problem}", file=sys.stderr)
    return 2


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def cmd_export_hf(folder: Path, out: Path) -> int:
    """The checkpoint's policy as a Hugging Face folder; exits 2 naming a damaged file."""
    from asyncrl.checkpoint import export_hf

    try:
        written = export_hf(folder, out)
    except CheckpointError as err:
        print(f"asyncrl: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} (load it with transformers, or as model.path / a vLLM model)")
    return 0
