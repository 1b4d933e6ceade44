"""Checkpoint folders: written whole or not at all, each file checksummed, the newest few kept.

A checkpoint is ``RUN_DIR/checkpoints/step-NNNNNN/``:

- ``engine/``: the trainer's DeepSpeed state (module, optimizer, LR schedule, torch RNG);
- ``run_state.json``: step, policy version and the scheduler's state (counters, prompt cursor,
  prompts to issue again, staleness history);
- ``config.yaml``: the resolved config the run used;
- ``trajectories.arrow`` (``run.checkpoint_store=arrow``): the scored groups not yet trained, as an Arrow
  IPC file (one record batch per group), put back into the store on resume;
- ``manifest.json``: step, version, creation time and ``{file: {bytes, sha256}}`` for every other file.

Everything is written into ``.tmp-step-NNNNNN`` first and renamed when complete, so a crash while
saving leaves the previous checkpoint as the newest one. Torch-free: the CLI lists and verifies
checkpoints without starting anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"
TRAJECTORIES_FILE = "trajectories.arrow"
FORMAT = 1
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupted; the message names the file."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    path: Path
    step: int
    version: int
    created: float
    """Unix time the checkpoint was completed."""
    bytes: int
    """Total size of the files the manifest lists."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    run_dir: Path, step: int, version: int, run_state: dict[str, Any], fill: Callable[[Path], None], keep: int
) -> Path:
    """Write the checkpoint of ``step``: ``fill(folder)`` writes the heavy parts (the trainer's engine
    state, the config), then the run state and the manifest; the folder is renamed into place when
    complete and only the newest ``keep`` checkpoints stay. Returns the checkpoint's folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    partial = root / f"{_TMP_PREFIX}{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    fill(partial)
    (partial / RUN_STATE).write_text(json.dumps({"step": step, "version": version, **run_state}, indent=1))
    files = {
        path.relative_to(partial).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(partial.rglob("*"))
        if path.is_file()
    }
    manifest = {"format": FORMAT, "step": step, "version": version, "created": time.time(), "files": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_tree(partial)
    if final.exists():  # the same step saved again (a signal right after a periodic checkpoint)
        shutil.rmtree(final)
    os.replace(partial, final)
    prune(root, keep)
    return final


def write_groups(folder: Path, groups: list, rank: int = 0) -> int:
    """The scored groups (Arrow tables of one schema) of trainer ``rank`` into ``folder/trajectories.arrow``
    (``trajectories-RANK.arrow`` for ranks > 0), one record batch per group, so a resume puts back the same
    groups; returns the rows written."""
    import pyarrow as pa

    if not groups:
        return 0
    name = TRAJECTORIES_FILE if rank == 0 else TRAJECTORIES_FILE.replace(".arrow", f"-{rank}.arrow")
    with pa.OSFile(str(Path(folder) / name), "wb") as sink, pa.ipc.new_file(sink, groups[0].schema) as out:
        for group in groups:
            out.write_batch(group.combine_chunks().to_batches()[0])
    return sum(group.num_rows for group in groups)


def read_groups(folder: Path) -> list:
    """The groups ``write_groups`` kept in a checkpoint (every rank's), one Arrow table each (none if it kept none)."""
    import pyarrow as pa

    groups = []
    for path in sorted(Path(folder).glob(TRAJECTORIES_FILE.replace(".arrow", "*.arrow"))):
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            groups += [pa.Table.from_batches([reader.get_batch(index)]) for index in range(reader.num_record_batches)]
    return groups


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """The complete checkpoints of a run, oldest first (partial ``.tmp-`` folders are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.glob("step-*")):
        try:
            found.append(read_info(folder))
        except CheckpointError:
            continue  # listed by `inspect`, which says what is wrong with it
    return sorted(found, key=lambda info: info.step)


def read_info(folder: Path) -> CheckpointInfo:
    manifest = read_manifest(folder)
    size = sum(int(entry["bytes"]) for entry in manifest["files"].values())
    return CheckpointInfo(
        Path(folder), int(manifest["step"]), int(manifest["version"]), float(manifest["created"]), size
    )


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise CheckpointError(f"no checkpoint folder {folder}")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {folder} is not a complete checkpoint") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    missing = [key for key in ("format", "step", "version", "created", "files") if key not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"{path} has format {manifest['format']}; this asyncrl reads format {FORMAT}")
    return manifest


def verify(folder: Path) -> list[str]:
    """What is wrong with a checkpoint, one line per file (missing, wrong size, wrong checksum,
    not in the manifest); empty when every file is as written."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError as err:
        return [str(err)]
    folder = Path(folder)
    problems = []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{path}: checksum differs from the manifest (corrupted)")
    listed = set(manifest["files"]) | {MANIFEST}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in listed:
            problems.append(f"{path}: not in the manifest")
    return problems


def load_run_state(folder: Path) -> dict[str, Any]:
    """The run state of a verified checkpoint; raises ``CheckpointError`` naming every bad file."""
    problems = verify(folder)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}")
    return json.loads((Path(folder) / RUN_STATE).read_text())


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root`` (and stale partial
    folders); returns what was removed."""
    complete = sorted(root.glob("step-*"))
    removed = complete[: max(0, len(complete) - keep)] + sorted(root.glob(f"{_TMP_PREFIX}step-*"))
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them: a power cut must not leave a
    complete-looking checkpoint with empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's fields as JSON (its config aside: the checkpoint's config.yaml holds that)."""
    state = {}
    for item in dataclasses.fields(scheduler):
        if item.name == "cfg":
            continue
        value = getattr(scheduler, item.name)
        if isinstance(value, dict):  # Counter: staleness -> samples
            value = {str(key): count for key, count in sorted(value.items())}
        elif isinstance(value, set):  # outstanding prompt indices
            value = sorted(value)
        elif isinstance(value, (list, tuple, deque)):
            value = list(value)
        state[item.name] = value
    return state


def export_hf(folder: Path, out: Path) -> Path:
    """Write a checkpoint's policy as a Hugging Face folder (config, tokenizer, safetensors weights)
    that transformers and vLLM load; the checkpoint is verified first."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    load_run_state(folder)  # raises naming any damaged file
    folder, out = Path(folder), Path(out)
    states = sorted((folder / "engine").glob("mp_rank_*_model_states.pt"))
    if not states:
        raise CheckpointError(f"{folder / 'engine'} holds no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    config = AutoConfig.from_pretrained(folder / "hf_config")
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(module.values())).dtype)
    missing, unexpected = model.load_state_dict(module, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{states[0]} does not fit the model in {folder / 'hf_config'}: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder / "hf_config").save_pretrained(out)
    return out
