"""``run.checkpoint_store=arrow`` on a real DeepSpeed trainer and a real store: the checkpoint keeps exactly the
scored groups not yet trained (those the trainer carries from a part-used entry and the entries it had not read),
a purged store gets them back on resume, and a new trainer trains each of them once."""

from __future__ import annotations

import pyarrow as pa
import pytest

from asyncrl.checkpoint import read_groups
from asyncrl.config import load_config
from asyncrl.models import build_tiny_model
from asyncrl.resume import restore_groups
from asyncrl.types import TRAJECTORY_SCHEMA, Streams, table_from_rows
from tests.conftest import first_server_only

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

GROUP = 4  # configs/tiny.yaml: rollout.group_size 4, trainer.prompts_per_step 2


def _group(index: int) -> pa.Table:
    rows = [
        {
            "sample_id": f"p{index}:{j}",
            "prompt_id": f"p{index}",
            "group_id": f"p{index}",
            "prompt_ids": [5, 6, 7],
            "response_ids": [10 + j, 20 + index],
            "behavior_logprobs": [-1.0, -1.5],
            "token_versions": [0, 0],
            "version_start": 0,
            "version_end": 0,
            "reward": float(j % 2),
            "reward_failed": False,
            "finish_reason": "length",
            "worker_id": "rollout-0",
            "gen_seconds": 0.0,
        }
        for j in range(GROUP)
    ]
    return table_from_rows(rows, TRAJECTORY_SCHEMA)


def _trained_ids(result: dict) -> set[str]:
    return {row["sample_id"] for row in result["ledger"]}


@first_server_only
def test_the_checkpoint_keeps_the_untrained_groups_and_a_resumed_trainer_trains_each_once(store, redis_url, tmp_path):
    from trainers.worker import TrainerWorker

    model = str(build_tiny_model(tmp_path / "model", seed=0))
    cfg = load_config(
        "configs/tiny.yaml", [f"run.name={store.run_id}", "run.checkpoint_store=arrow", "run.step_timeout_s=30"]
    )
    trainer = TrainerWorker(cfg, model, redis_url)
    groups = [_group(index) for index in range(6)]
    store.put(Streams.TRAJECTORIES, pa.concat_tables(groups[:3]))  # one entry of three groups
    for group in groups[3:]:
        store.put(Streams.TRAJECTORIES, group)

    first = _trained_ids(trainer.train_step(0))  # two groups; the third of the first entry stays carried
    assert first == {f"p{i}:{j}" for i in (0, 1) for j in range(GROUP)}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    kept_rows = trainer.save_checkpoint(str(folder), keep_groups=True)
    kept = read_groups(folder)
    assert kept_rows == 4 * GROUP and [g.column("prompt_id")[0].as_py() for g in kept] == ["p2", "p3", "p4", "p5"]
    assert all(g.equals(groups[i + 2]) for i, g in enumerate(kept))  # the same rows and values, untouched
    # The run that wrote the checkpoint goes on as before: the kept groups are still its next ones.
    assert _trained_ids(trainer.train_step(1)) == {f"p{i}:{j}" for i in (2, 3) for j in range(GROUP)}

    store.purge()  # what `ckpt resume` does first; then the workers start, then the groups go back
    resumed = TrainerWorker(cfg, model, redis_url)
    assert restore_groups(store, folder) == {2, 3, 4, 5}
    again = _trained_ids(resumed.train_step(1)) | _trained_ids(resumed.train_step(1))  # within the bound
    assert again == {f"p{i}:{j}" for i in range(2, 6) for j in range(GROUP)}  # each kept sample once, none else
