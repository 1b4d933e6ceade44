"""TrainerWorker: a DeepSpeed policy that streams scored groups from the store into optimizer steps.

One ``train_step`` call is one optimizer step: it pulls groups as soon as they are in the store,
drops those over the staleness bound, runs forward/backward per micro-batch as rows arrive, and
steps when the global batch is complete. Entries are acknowledged only after the step, so a
trainer that dies mid-step leaves them pending for a successor.
"""

from __future__ import annotations

import time

import pyarrow as pa

from asyncrl.config import Config
from asyncrl.scheduler import is_stale, staleness
from asyncrl.types import Groups, Streams


class TrainerWorker:
    def __init__(self, cfg: Config, model_path: str, store_url: str) -> None:
        from storage import TrajectoryStore, connect
        from trainers.policy import PolicyTrainer

        self.cfg = cfg
        self.store = TrajectoryStore(connect(store_url, cfg.store.timeout_s), cfg.run.name, cfg.store.timeout_s)
        self.store.ensure_group(Streams.TRAJECTORIES, Groups.TRAINER)
        tc = cfg.trainer
        self.policy = PolicyTrainer(
            model_path,
            dtype=cfg.model.dtype,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            grad_clip=tc.grad_clip,
            zero_stage=tc.zero_stage,
            micro_batch_size=tc.micro_batch_size,
            grad_accum_steps=cfg.samples_per_step // tc.micro_batch_size,
            temperature=cfg.rollout.temperature,
            clip_eps=tc.clip_eps,
            seed=cfg.run.seed,
        )
        from transformers import AutoTokenizer

        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0

    def ready(self) -> bool:
        return True

    def weights(self) -> dict:
        """Full weights as numpy arrays (they travel through Ray's shared-memory object store)."""
        return {name: tensor.float().numpy() for name, tensor in self.policy.named_weights()}

    def train_step(self, version: int) -> dict:
        """Consumes scored groups; waits on the store with bounded blocks until the global batch is full.

        Unblocked by: rollout workers pushing groups. Fails after ``run.step_timeout_s``.
        """
        from trainers.batch import collate, with_advantages

        cfg, started = self.cfg, time.monotonic()
        deadline = started + cfg.run.step_timeout_s
        needed, micro = cfg.samples_per_step, cfg.trainer.micro_batch_size
        pending: list[pa.Table] = []
        entry_ids, ledger, stats = [], [], []
        trained = 0
        compute_seconds = 0.0
        while trained < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer waited {cfg.run.step_timeout_s}s for {needed} samples, got {trained}")
            for entry in self.store.read(Streams.TRAJECTORIES, Groups.TRAINER, "trainer-0", count=1, block_ms=500):
                entry_ids.append(entry.id)
                group = entry.table
                version_start = min(group.column("version_start").to_pylist())
                if is_stale(version, version_start, cfg.scheduler.max_staleness):
                    self.store.put(
                        Streams.DROPPED, group.select(["prompt_id"]).slice(0, 1), {"version_start": version_start}
                    )
                    continue
                pending.append(with_advantages(group))
                for row in group.select(
                    ["sample_id", "version_start", "version_end", "reward", "reward_failed", "worker_id"]
                ).to_pylist():
                    ledger.append({**row, "trained_at_version": version})
            while _rows(pending) >= micro or (pending and trained + _rows(pending) == needed):
                batch_table, pending = _split(pending, micro)
                tic = time.monotonic()
                stats.append(self.policy.forward_backward(collate(batch_table, self.pad_id)))
                compute_seconds += time.monotonic() - tic
                trained += batch_table.num_rows
        tic = time.monotonic()
        step_stats = self.policy.optimizer_step()
        compute_seconds += time.monotonic() - tic
        self.store.ack(Streams.TRAJECTORIES, Groups.TRAINER, entry_ids)
        tokens = sum(micro_stats.pop("tokens") for micro_stats in stats)  # the rest are per-micro-batch means
        return {
            "ledger": ledger,
            "staleness": [staleness(version, row["version_start"]) for row in ledger],
            "samples": trained,
            "tokens": int(tokens),
            "compute_seconds": compute_seconds,
            "wait_seconds": time.monotonic() - started - compute_seconds,
            **step_stats,
            **{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]},
        }


def _rows(tables: list[pa.Table]) -> int:
    return sum(t.num_rows for t in tables)


def _split(tables: list[pa.Table], rows: int) -> tuple[pa.Table, list[pa.Table]]:
    """The first ``rows`` rows of the queued tables, and the rest."""
    whole = pa.concat_tables(tables)
    return whole.slice(0, rows), ([whole.slice(rows)] if whole.num_rows > rows else [])
