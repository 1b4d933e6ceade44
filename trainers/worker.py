"""TrainerWorker: a DeepSpeed policy that streams scored groups from the store into optimizer steps.

One ``train_step`` call is one optimizer step: it pulls groups as soon as they are in the store,
drops those over the staleness bound (and, with ``trainer.filter_equal_groups``, those whose
rewards are all equal), scores advantages, runs forward/backward per micro-batch as rows arrive,
and steps when the global batch is complete. Entries are acknowledged only after the step, so a
trainer that dies mid-step leaves them pending for a successor.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from asyncrl.config import Config, ConfigError
from asyncrl.scheduler import is_stale, staleness
from asyncrl.types import TRAJECTORY_SCHEMA, Groups, Streams

if TYPE_CHECKING:  # both import torch, which the controller process never loads
    from asyncrl.algorithms.loss import LossConfig
    from trainers.batch import Scoring


class TrainerWorker:
    def __init__(self, cfg: Config, model_path: str, store_url: str, rank: int = 0, master: str = "") -> None:
        """``rank`` of ``cfg.trainer_ranks`` data-parallel ranks; with more than one, ``master`` (``host:port`` on
        rank 0's node) is where their gloo/NCCL group meets: the constructor returns once every rank joined."""
        import os

        from storage import TrajectoryStore
        from trainers.policy import PolicyTrainer

        self.cfg, self.rank, self.consumer = cfg, rank, f"trainer-{rank}"
        self.version = 0  # the policy version the weights are at (the scheduler's, told by train_step and resume)
        self._step_lock = threading.Lock()  # the optimizer step against a concurrent ``snapshot``
        if cfg.trainer_ranks > 1:
            host, _, port = master.rpartition(":")
            os.environ.update(
                RANK=str(rank), WORLD_SIZE=str(cfg.trainer_ranks), LOCAL_RANK="0", MASTER_ADDR=host, MASTER_PORT=port
            )
        self.store = TrajectoryStore.from_config(store_url, cfg.run.name, cfg.store)
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
            grad_accum_steps=cfg.samples_per_rank // tc.micro_batch_size,
            temperature=cfg.rollout.temperature,
            loss=tc.loss,
            loss_config=build_loss_config(cfg),
            seed=cfg.run.seed,
        )
        self.scoring = build_scoring(cfg)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.carry: list[tuple[pa.Table, str]] = []  # groups read but not yet considered, with their entry id
        self.entry_groups: dict[str, int] = {}  # entry id -> its groups not yet trained or dropped
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="trainer-prefetch")
        self._prefetch: Future | None = None  # a read of the next step's entries, started while this one computes

    def ready(self) -> bool:
        return True

    def memory(self) -> dict[str, float]:
        """This process's pid and resident memory in MB (``rss`` now, ``peak``)."""
        import os

        from asyncrl.resources import process_memory_mb

        return {"pid": os.getpid(), **process_memory_mb()}

    def _next_group(self, max_entries: int = 1) -> tuple[pa.Table, str] | None:
        """The next group to consider, with the id of the store entry it came in.

        An entry may hold several groups (``store.rows_per_message``); those this step does not
        need wait in ``carry`` for the next one, and the entry is acknowledged only once every
        group of it has been trained or dropped. Waits at most one bounded read for up to
        ``max_entries`` new entries (one round trip for all the groups already waiting);
        an entry whose payload is broken or of the wrong schema goes to the dead-letter stream.
        """
        if not self.carry:
            self._read_entries(max_entries, block_ms=500)
        return self.carry.pop(0) if self.carry else None

    def _read_entries(self, count: int, block_ms: int) -> int:
        """Read up to ``count`` new trajectory entries into ``carry``, a group at a time; returns the entries. The
        entries a prefetch read (``_start_prefetch``) come first: then there is no read now."""
        from trainers.batch import split_groups

        entries = self._take_prefetch() or self._read(count, block_ms)
        for entry in entries:
            groups = split_groups(entry.table)
            self.entry_groups[entry.id] = len(groups)
            self.carry.extend((group, entry.id) for group in groups)
        return len(entries)

    def _read(self, count: int, block_ms: int) -> list:
        return self.store.read(
            Streams.TRAJECTORIES,
            Groups.TRAINER,
            self.consumer,
            count=count,
            block_ms=block_ms,
            expect=TRAJECTORY_SCHEMA,
        )

    def _start_prefetch(self, count: int) -> None:
        """Read up to ``count`` entries already in the store (no wait) on the reader thread while this step computes
        (forward and backward release the GIL), for the next step; nothing is dropped or trained here, the staleness
        bound is checked when a group is taken."""
        if self._prefetch is None and not self.carry:
            self._prefetch = self._reader.submit(self._read, count, 0)

    def _take_prefetch(self) -> list:
        """The entries the prefetch read (waiting for it to end), once; [] without one."""
        prefetch, self._prefetch = self._prefetch, None
        return [] if prefetch is None else prefetch.result(timeout=self.cfg.run.step_timeout_s)

    def _consumed(self, entry_id: str, finished: list[str]) -> None:
        self.entry_groups[entry_id] -= 1
        if self.entry_groups[entry_id] == 0:
            del self.entry_groups[entry_id]
            finished.append(entry_id)

    def _report_dropped(self, group: pa.Table, meta: dict) -> None:
        self.store.put(Streams.DROPPED, group.select(["prompt_id"]).slice(0, 1), meta)

    def save_checkpoint(self, folder: str, keep_groups: bool = False) -> int:
        """Write the policy's engine state, with the tokenizer beside its HF config, into a checkpoint folder
        (called between steps: nothing is in a step). ``keep_groups`` (``run.checkpoint_store=arrow``): also every
        scored group not yet trained, the carried ones and those still unread in the store, which stay carried
        for the next step as well; returns the rows kept."""
        import os

        from asyncrl.checkpoint import write_groups

        self.policy.save_state(folder)  # every rank: DeepSpeed writes each one's optimizer partition
        if self.rank == 0:
            self.tokenizer.save_pretrained(os.path.join(folder, "hf_config"))
        if not keep_groups:
            return 0
        while self._read_entries(100, block_ms=0):
            pass
        return write_groups(folder, [group for group, _ in self.carry], self.rank)

    def load_checkpoint(self, folder: str, version: int = 0) -> None:
        """Restore the policy's engine state (module, optimizer, LR schedule) and RNG from a checkpoint folder (of
        policy ``version``), at this run's ``trainer.lr`` (a resume may change it); called before the first step."""
        self.policy.load_state(folder, lr=self.cfg.trainer.lr)
        self.version = version

    def weights(self) -> dict:
        """Full weights as numpy arrays (they travel through Ray's shared-memory object store)."""
        return {name: tensor.float().numpy() for name, tensor in self.policy.named_weights()}

    def snapshot(self) -> tuple[dict, int]:
        """A copy of the weights as they are now, with their policy version; safe while a step runs (the actor
        takes two calls at once): forward and backward leave the weights alone and the optimizer step waits for the
        copy. A restarted rollout worker gets these at once instead of waiting for the step to end."""
        with self._step_lock:
            return {name: tensor.float().numpy().copy() for name, tensor in self.policy.named_weights()}, self.version

    # -- bucketed weight sync (sync.transport=broadcast|store; asyncrl/weight_sync.py drives these) --

    def sync_host(self, timeout_s: float) -> int:
        """Port of this process's rendezvous TCPStore on loopback (created on first call)."""
        from asyncrl.sync.broadcast import host_rendezvous

        return host_rendezvous(timeout_s).port

    def sync_plan(self, pool: str, dtype: str, bucket_mb: float, tensor_parallel: int = 1) -> dict:
        """The pool's sync plan from this policy's tensors, as plain data (computed once per link); with
        ``tensor_parallel`` > 1 each of the engines' TP ranks gets buckets of its own shards."""
        from asyncrl.sync.plan import SyncPlan, module_tensors
        from asyncrl.sync.tp_layout import AttentionHeads

        module = self.policy.engine.module
        shapes = [(name, tuple(tensor.shape)) for name, tensor in module_tensors(module).items()]
        heads = AttentionHeads.from_config(module.config) if tensor_parallel > 1 else None
        plan = SyncPlan.build(
            shapes, pool=pool, dtype=dtype, bucket_mb=bucket_mb, tensor_parallel=tensor_parallel, heads=heads
        )
        return plan.to_dict()

    def sync_connect(self, spec, plan: dict) -> None:
        """Join the pool's link as rank 0 (collective with its engines); replaces an older link of the pool."""
        from asyncrl.sync.plan import SyncPlan
        from asyncrl.sync.sender import PoolSender
        from asyncrl.sync.transport import SENDER_RANK, build_transport

        senders = getattr(self, "_sync_senders", {})
        old = senders.pop(spec.pool, None)
        if old is not None:
            old.close()
        transport = build_transport(spec, SENDER_RANK)
        senders[spec.pool] = PoolSender(SyncPlan.from_dict(plan), transport, spec.timeout_s, spec.device)
        self._sync_senders = senders

    def sync_disconnect(self, pool: str) -> None:
        """Stop sending to ``pool`` (no engine of it is left in its group) until it connects again."""
        sender = getattr(self, "_sync_senders", {}).pop(pool, None)
        if sender is not None:
            sender.close()

    def sync_send(self, version: int) -> dict:
        """Send the current weights to every connected pool; ``{pool: seconds}``."""
        from asyncrl.sync.plan import module_tensors
        from asyncrl.sync.sender import send_to_pools

        # No copy: the optimizer does not step while this runs (the controller syncs between steps).
        stats = send_to_pools(self._sync_senders, module_tensors(self.policy.engine.module), version)
        return {pool: stat.seconds for pool, stat in stats.items()}

    def discard_pending(self) -> int:
        """Acknowledge, untrained, every trajectory entry waiting or carried; returns how many (between the
        phases of ``asyncrl bench pipeline``, once no rollout worker holds a prompt)."""
        ids = set(self.entry_groups) | {entry.id for entry in self._take_prefetch()}
        while entries := self.store.read(Streams.TRAJECTORIES, Groups.TRAINER, self.consumer, count=100, block_ms=0):
            ids.update(entry.id for entry in entries)
        self.carry, self.entry_groups = [], {}
        self.store.ack(Streams.TRAJECTORIES, Groups.TRAINER, sorted(ids))
        return len(ids)

    def train_step(self, version: int, max_staleness: int | None = None) -> dict:
        """Consumes scored groups; waits on the store with bounded blocks until the global batch is full.

        Groups over ``max_staleness`` (default ``scheduler.max_staleness``) are dropped.
        Unblocked by: rollout workers pushing groups. Fails after ``run.step_timeout_s``.
        """
        from trainers.batch import GroupScorer, collate

        cfg, started = self.cfg, time.monotonic()
        self.version = version  # what the weights are at until this step's optimizer step
        bound = cfg.scheduler.max_staleness if max_staleness is None else max_staleness
        deadline = started + cfg.run.step_timeout_s
        needed, micro = cfg.samples_per_rank, cfg.trainer.micro_batch_size  # this rank's share of the global batch
        pending: list[pa.Table] = []
        scorer = GroupScorer(self.scoring, needed)
        finished_entries, ledger, stats = [], [], []
        trained = accepted = filtered = 0
        compute_seconds = 0.0
        while trained < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer waited {cfg.run.step_timeout_s}s for {needed} samples, got {trained}")
            # Every entry holds at least one whole group: never read more entries than the step still needs.
            taken = self._next_group(-(-(needed - accepted) // cfg.rollout.group_size)) if accepted < needed else None
            if taken is not None:
                group, entry_id = taken
                self._consumed(entry_id, finished_entries)
                version_start = min(group.column("version_start").to_pylist())
                if is_stale(version, version_start, bound):
                    self._report_dropped(group, {"version_start": version_start})
                elif not scorer.accept(group):
                    # Reported like a stale drop, so the controller frees the group's admission slot
                    # and issues another prompt in its place (DAPO's dynamic sampling).
                    self._report_dropped(group, {"version_start": version_start, "reason": "equal_rewards"})
                    filtered += 1
                else:
                    accepted += group.num_rows
                    ledger.extend(_ledger_rows(group, version))
                if self.carry and accepted < needed:
                    continue  # the groups already read are scored together (one estimator call), then trained
            pending.extend(scorer.ready())
            if accepted >= needed:  # after the scoring: the read then overlaps forward and backward only
                self._start_prefetch(-(-needed // cfg.rollout.group_size))
            while _rows(pending) >= micro or (pending and trained + _rows(pending) == needed):
                batch_table, pending = _split(pending, micro)
                tic = time.monotonic()
                stats.append(self.policy.forward_backward(collate(batch_table, self.pad_id)))
                compute_seconds += time.monotonic() - tic
                trained += batch_table.num_rows
        tic = time.monotonic()
        with self._step_lock:
            step_stats = self.policy.optimizer_step()
            self.version = version + 1
        compute_seconds += time.monotonic() - tic
        self.store.ack(Streams.TRAJECTORIES, Groups.TRAINER, finished_entries)
        tokens = sum(micro_stats.pop("tokens") for micro_stats in stats)  # the rest are per-micro-batch means
        return {
            "ledger": ledger,
            "staleness": [staleness(version, row["version_start"]) for row in ledger],
            "samples": trained,
            "filtered_groups": filtered,
            "tokens": int(tokens),
            "compute_seconds": compute_seconds,
            "wait_seconds": time.monotonic() - started - compute_seconds,
            **step_stats,
            **{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]},
        }


def build_loss_config(cfg: Config) -> LossConfig:
    """The policy loss's settings from ``cfg.trainer``; an unset clip side takes ``trainer.clip_eps``."""
    from asyncrl.algorithms.loss import LossConfig

    tc = cfg.trainer
    return LossConfig(
        clip_eps_low=tc.clip_eps if tc.clip_eps_low is None else tc.clip_eps_low,
        clip_eps_high=tc.clip_eps if tc.clip_eps_high is None else tc.clip_eps_high,
        dual_clip=tc.dual_clip,
        loss_agg=tc.loss_agg,
        max_response_len=cfg.rollout.max_new_tokens,
        tis_cap=tc.tis_cap,
        ratio_band_low=tc.ratio_band_low,
        ratio_band_high=tc.ratio_band_high,
        kl_coef=tc.kl_coef,
        kl_estimator=tc.kl_estimator,
    )


def build_scoring(cfg: Config) -> Scoring:
    """How rewards become advantages, from ``cfg.trainer``; overlong lengths count to ``rollout.max_new_tokens``."""
    from trainers.batch import Scoring

    tc = cfg.trainer
    if tc.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"trainer.overlong_buffer ({tc.overlong_buffer}) must be <= rollout.max_new_tokens "
            f"({cfg.rollout.max_new_tokens}): the penalty grows over the last overlong_buffer tokens"
        )
    return Scoring(
        advantage=tc.advantage,
        max_response_len=cfg.rollout.max_new_tokens,
        overlong_buffer=tc.overlong_buffer,
        overlong_penalty=tc.overlong_penalty,
        filter_equal_groups=tc.filter_equal_groups,
    )


def _ledger_rows(group: pa.Table, version: int) -> list[dict]:
    """The ledger's rows of an accepted group, trained at policy ``version``."""
    from trainers.batch import mask_summary

    columns = ["sample_id", "prompt_id", "version_start", "version_end", "reward", "reward_failed"]
    columns += ["reward_error", "reward_components", "loss_mask", "worker_id"]
    rows = []
    for row in group.select(columns).to_pylist():
        components = dict(row.pop("reward_components") or ())  # an Arrow map reads as (key, value) pairs
        row.update(mask_summary(row.pop("loss_mask")))  # multi-turn: turns and observation tokens
        rows.append({**row, "reward_components": components, "trained_at_version": version})
    return rows


def _rows(tables: list[pa.Table]) -> int:
    return sum(t.num_rows for t in tables)


def _split(tables: list[pa.Table], rows: int) -> tuple[pa.Table, list[pa.Table]]:
    """The first ``rows`` rows of the queued tables, and the rest."""
    whole = pa.concat_tables(tables)
    return whole.slice(0, rows), ([whole.slice(rows)] if whole.num_rows > rows else [])
