"""`asyncrl ckpt resume`: continue a run from one of its checkpoints, in its folder, at the step after it.

``plan_resume`` checks everything before anything starts: the checkpoint against its manifest, the
overrides against the checkpoint's config (``RESUMABLE`` may change, anything else is refused naming
the key and why), and that steps are left. ``truncate_run_logs`` then cuts metrics.jsonl and
ledger.jsonl back to the checkpoint, so a step the killed run logged after it is not counted twice.
The run's store keys are purged; ``restore_groups`` puts back the scored groups the checkpoint kept
(``run.checkpoint_store=arrow``) and the other prompts outstanding at the checkpoint are issued again
(``Scheduler.from_state``). Torch-free, like the rest of the checkpoint tooling.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrl.checkpoint import CheckpointError, load_run_state, read_groups
from asyncrl.config import Config, ConfigError, load_config, to_dict

log = logging.getLogger(__name__)

RESUMABLE = (
    "run.steps", "run.checkpoint_every", "run.keep_checkpoints", "run.checkpoint_store", "run.step_timeout_s", "run.progress", "run.wandb",
    "run.wandb_project", "run.num_cpus", "run.object_store_mb", "run.ray_address", "trainer.lr", "trainer.threads",
    "rollout.threads", "rollout.num_workers", "rollout.max_num_seqs", "rollout.kv_cache_mb", "scheduler.", "store.",
    "sync.", "simulate.", "stages.",
)  # fmt: skip
"""Config keys (or key prefixes, ending in a dot) a resume may change: length, logging, resources, the
learning rate, the staleness schedule, the store, the weight sync and the pipeline stages (the store is emptied
on resume, so no entry is caught between two layouts). Everything else is frozen."""

FROZEN_BECAUSE = {
    "model.": "the checkpoint holds this model's weights and optimizer state",
    "model.dtype": "the DeepSpeed state was saved in this dtype",
    "data.": "the prompt cursor and the outstanding prompt indices refer to this prompt stream",
    "rollout.group_size": "the trained and outstanding prompts are groups of this size",
    "trainer.prompts_per_step": "the scheduler's admission counters are in global batches of this many prompts",
    "trainer.micro_batch_size": "the loss is a mean over micro-batches of this size (gradient accumulation)",
    "trainer.zero_stage": "the optimizer state is partitioned for this ZeRO stage",
    "run.name": "it is the run's id (store keys, the run folder)",
    "run.seed": "a resume continues the same seeded run",
    "run.dir": "a resume continues in the checkpoint's run folder (CKPT/../..)",
    "run.overwrite": "a resume appends to the run in its folder and never replaces it",
}
"""Why a frozen key may not change, by key or key prefix (the longest match wins)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """A verified checkpoint to continue from; the run goes on in ``run_dir`` at step ``step + 1``."""

    checkpoint: Path
    run_dir: Path
    step: int
    version: int
    run_state: dict[str, Any]


def plan_resume(checkpoint: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Resume]:
    """The config to resume with (the checkpoint's, with ``overrides``) and what to resume from.

    Raises ``CheckpointError`` naming every damaged file, or ``ConfigError`` naming a refused key."""
    folder = Path(checkpoint).resolve()
    run_state = load_run_state(folder)
    if "outstanding" not in run_state.get("scheduler", {}):
        raise CheckpointError(
            f"{folder / 'run_state.json'} has no outstanding prompts (written before asyncrl tracked them): "
            "resuming it would lose the prompts in flight at the checkpoint"
        )
    saved = load_config(folder / "config.yaml")
    cfg = load_config(folder / "config.yaml", overrides)
    check_compatible(saved, cfg)
    step = int(run_state["step"])
    if cfg.run.steps <= step:
        raise ConfigError(
            f"run.steps is {cfg.run.steps} but {folder} is at step {step}: pass run.steps=N with N > {step} to train on"
        )
    run_dir = folder.parent.parent
    cfg.run.dir = str(run_dir)
    return cfg, Resume(folder, run_dir, step, int(run_state["version"]), run_state)


def check_compatible(saved: Config, new: Config) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key outside ``RESUMABLE``; the error
    names each such key, its two values and why it is frozen."""
    before, after = _flatten(to_dict(saved)), _flatten(to_dict(new))
    refused = [
        f"{key} cannot change on resume ({before.get(key)!r} -> {after.get(key)!r}): {_frozen_because(key)}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and not _resumable(key)
    ]
    if refused:
        raise ConfigError("; ".join(refused))


def _resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE)


def _frozen_because(key: str) -> str:
    matches = [
        prefix for prefix in FROZEN_BECAUSE if key == prefix or (prefix.endswith(".") and key.startswith(prefix))
    ]
    if matches:
        return FROZEN_BECAUSE[max(matches, key=len)]
    return f"only {', '.join(RESUMABLE)} may change (a key ending in '.' stands for its section)"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for a nested dict; a list (pools, reward terms) is one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def truncate_run_logs(run_dir: Path, step: int, version: int) -> dict[str, int]:
    """Cut the run's logs back to a checkpoint at ``step`` / ``version``: metrics.jsonl keeps the records of
    steps <= ``step``, ledger.jsonl the samples trained at a version < ``version`` (those of the steps before
    the checkpoint). Returns the lines dropped per file; a missing file counts 0."""
    keep = {
        "metrics.jsonl": lambda row: row["step"] <= step,
        "ledger.jsonl": lambda row: row["trained_at_version"] < version,
    }
    return {name: _filter_jsonl(Path(run_dir) / name, wanted) for name, wanted in keep.items()}


def _filter_jsonl(path: Path, wanted) -> int:
    """Rewrite ``path`` with the lines whose record is ``wanted`` (through a temporary file and a rename, so a
    crash leaves the old or the new file); a cut-off last line (a run killed mid-write) is dropped too."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                continue
            raise CheckpointError(f"{path} line {number} is not JSON ({err}); the run's log is damaged") from None
        if wanted(record):
            kept.append(line)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)
    return len(lines) - len(kept)


def purge_store(cfg: Config, url: str) -> int:
    """Delete the run's store keys left by the run that wrote the checkpoint (an AOF, an external store): the
    resumed run starts on an empty store and issues the outstanding prompts again. Returns the keys deleted."""
    from storage import TrajectoryStore

    store = TrajectoryStore.from_config(url, cfg.run.name, cfg.store)
    try:
        return store.purge()
    finally:
        store.close()


def restore_groups(store, checkpoint: Path) -> set[int]:
    """Put the scored groups a checkpoint kept back on the (purged) trajectory stream, one entry each, before
    any prompt is issued; returns their prompt indices (not issued again)."""
    from asyncrl.data import prompt_index
    from asyncrl.types import Streams

    groups = read_groups(checkpoint)
    for group in groups:
        store.put(Streams.TRAJECTORIES, group)
    return {prompt_index(group.column("prompt_id")[0].as_py()) for group in groups}
