"""RolloutWorker: one vLLM engine that turns prompt entries into scored trajectory groups.

Runs as a threaded Ray actor: a generation loop owns the engine; ``update_weights`` arrives on
another thread and lands between two engine steps (the engine's lock makes the switch atomic).
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import re
import threading
import time
import warnings
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from asyncrl.config import Config
from asyncrl.data import encode_prompt
from asyncrl.lengths import length_budget
from asyncrl.rewards import build_scorer
from asyncrl.types import GENERATED_SCHEMA, TRAJECTORY_SCHEMA, Groups, Streams, table_from_rows
from rollout.multiturn import build_driver

log = logging.getLogger(__name__)

# While decoding with nothing new in sight, look for prompts at most this often: a store round trip per engine
# step costs a few percent on a small model. A freed slot or a read that found prompts polls at once.
BUSY_POLL_S = 0.05
RATE_HORIZON_S = 2.0  # the decode rate is a mean over about this many recent busy seconds
# Flushes handed to the writer thread and not yet written, at most: a store that stays full holds the loop soon.
FLUSH_QUEUE = 2


@dataclass
class DecodeRate:
    """A worker's decode rate: tokens sampled per busy second, decayed over ``RATE_HORIZON_S`` so it follows
    a changing load (batch size, response lengths) but not one step's noise."""

    tokens: int = 0  # since start
    busy_seconds: float = 0.0  # since start: engine steps, scoring and the test-only delay
    _recent_tokens: float = 0.0
    _recent_seconds: float = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.busy_seconds += seconds
        keep = math.exp(-seconds / RATE_HORIZON_S)
        self._recent_tokens = keep * self._recent_tokens + tokens
        self._recent_seconds = keep * self._recent_seconds + seconds

    @property
    def tokens_per_s(self) -> float:
        """0 until the first engine step."""
        return self._recent_tokens / self._recent_seconds if self._recent_seconds > 0 else 0.0


def groups_within_budget(
    budget_s: float, tokens_per_s: float, pending_tokens: int, group_tokens: int, idle: bool
) -> int:
    """New prompt groups a worker may take: its running requests' remaining ``pending_tokens`` plus the new
    groups' (at most ``group_tokens`` each) must drain within ``budget_s`` at its recent decode rate. An idle
    engine always takes one, so no worker waits while prompts are queued; before the first engine step (no
    rate yet) a worker takes one group, and only when idle."""
    if not tokens_per_s:
        return int(idle)
    room = budget_s * tokens_per_s - pending_tokens
    return max(int(idle), math.ceil(room / group_tokens))


@dataclass
class _Group:
    """The G samples of one prompt, filled as the engine finishes them."""

    entry_id: str
    prompt_id: str
    prompt_text: str
    answer: str
    size: int
    done: list = field(default_factory=list)


class RolloutWorker:
    def __init__(self, cfg: Config, model_path: str, store_url: str, worker_id: str) -> None:
        from transformers import AutoTokenizer

        from rollout.engine import GenerationEngine
        from storage import TrajectoryStore

        self.cfg, self.worker_id, self.store_url = cfg, worker_id, store_url
        self.store = TrajectoryStore.from_config(store_url, cfg.run.name, cfg.store)
        self.writer: _Writer | None = None  # puts the scored groups; started with the loop
        self.store.ensure_group(Streams.PROMPTS, Groups.ROLLOUT)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.reward = None if cfg.stages.reward else build_scorer(cfg.reward)  # stages.reward: the stage scores
        self.output = Streams.GENERATED if cfg.stages.enabled else Streams.TRAJECTORIES
        self.engine = GenerationEngine(
            model_path,
            dtype=cfg.model.dtype,
            max_model_len=cfg.rollout.max_model_len,
            max_num_seqs=cfg.rollout.max_num_seqs,
            kv_cache_mb=cfg.rollout.kv_cache_mb,
            seed=cfg.run.seed,
            recompute_kv_on_update=cfg.sync.recompute_kv,
            tensor_parallel=_tensor_parallel(cfg, worker_id),
        )
        self.turns = build_driver(cfg, self.engine, self.tokenizer)  # rollout.env: multi-turn episodes, else None
        self.groups: dict[str, _Group] = {}
        self.entry_groups: dict[str, int] = {}  # prompt entry id -> groups of it not yet put in the store
        self.outbox: list[tuple[list[dict], str]] = []  # scored groups' rows not yet put, with their prompt entry id
        self.entry_put: dict[str, list[str]] = {}  # prompt entry id -> prompt ids of its groups already put
        self._next_poll = 0.0
        self._poll_now = True  # a group slot was freed, or the last read found prompts (more are likely queued)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.idle_seconds = 0.0  # loop time with no request in the engine (waiting for prompts), since start
        self.decode = DecodeRate()
        self.token_delay_s = cfg.rollout.token_delay_s(_worker_index(worker_id))  # test only: a slow engine
        self.error: BaseException | None = None

    def ready(self) -> str:
        return self.worker_id

    def start(self) -> int:
        """Take back what this worker id held before (``_reclaim``), then start the generation loop;
        returns the prompt entries taken back."""
        from storage import TrajectoryStore

        reclaimed = self._reclaim()
        store = TrajectoryStore.from_config(self.store_url, self.cfg.run.name, self.cfg.store)
        self.writer = _Writer(store, f"rollout-{self.worker_id}-writer")
        self._thread = threading.Thread(target=self._run, name=f"rollout-{self.worker_id}", daemon=True)
        self._thread.start()
        return reclaimed

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.writer is not None:
            self.writer.close(timeout_s=30)
        self.engine.close()

    def health(self) -> str | None:
        """None while the loop is alive, else the error that ended it."""
        return None if self.error is None else repr(self.error)

    def status(self) -> dict:
        """``pid`` of this process (a restarted actor has a new one), ``started`` (the loop was started in this
        process) and ``error`` (as ``health``)."""
        import os

        return {"pid": os.getpid(), "started": self._thread is not None, "error": self.health()}

    def load(self) -> dict[str, float]:
        """``idle_seconds``: generation-loop seconds with no request in the engine since start (cumulative);
        ``inflight``: requests in the engine now; ``tokens`` sampled and ``busy_seconds`` stepping since start
        (a restarted worker counts from zero again);
        ``tokens_per_s``: the recent decode rate that ``rollout.inflight_budget_s`` measures work against."""
        return {
            "idle_seconds": self.idle_seconds,
            "inflight": self.engine.num_unfinished(),
            "tokens": self.decode.tokens,
            "busy_seconds": self.decode.busy_seconds,
            "tokens_per_s": self.decode.tokens_per_s,
        }

    def memory(self) -> dict[str, float]:
        """This process's pid and resident memory in MB (``rss`` now, ``peak``); the vLLM engine is in it."""
        import os

        from asyncrl.resources import process_memory_mb

        return {"pid": os.getpid(), **process_memory_mb()}

    def update_weights(self, weights: dict, version: int) -> float:
        """Load new weights between two engine steps; returns seconds spent."""
        import torch

        # The arrays are read-only views of Ray's shared memory; the engine copies them into its
        # parameters and never writes through them, so the tensors need no private copy.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [(name, torch.from_numpy(array)) for name, array in weights.items()]
        return self.engine.update_weights(tensors, version)

    def sync_connect(self, plan: dict, spec, rank: int) -> None:
        """Join a bucketed weight-sync link as ``rank`` (collective with the trainer; replaces an older link)."""
        from asyncrl.sync.receiver import WeightReceiver

        old, self.receiver = getattr(self, "receiver", None), None
        if old is not None:
            old.close()
        self.receiver = WeightReceiver.connect(plan, spec, rank)

    def sync_receive(self, version: int, mode: str) -> dict:
        """Stage every bucket of ``version`` and switch at a step boundary; the generation loop keeps
        stepping meanwhile (``inflight``) or waits from the first bucket to the switch (``pause``)."""
        from dataclasses import asdict

        pause = {"inflight": None, "pause": self.engine.paused}[mode]
        return asdict(self.receiver.sync(version, self.receiver.apply_to(self.engine), pause))

    def _run(self) -> None:
        """Consumes prompt entries; waits on the store (bounded block) when the engine is idle.

        Unblocked by: the controller issuing prompts (admission) or the engine finishing a step.
        """
        try:
            while not self._stop.is_set():
                self.writer.raise_error()
                tic, idle = time.monotonic(), not self.engine.num_unfinished()
                self._take_prompts()  # with an empty engine it blocks up to 200 ms on the store
                if idle:
                    self.idle_seconds += time.monotonic() - tic
                if self.engine.num_unfinished():
                    self._step()
                if self.outbox and (self._outbox_full() or not self.engine.num_unfinished()):
                    self._flush()
        except BaseException as err:  # the fault boundary of this worker: reported via health()
            log.exception("rollout worker %s stopped", self.worker_id)
            self.error = err

    def _step(self) -> None:
        """One engine step and the scoring of the groups it finished; the time counts to the decode rate."""
        tic, sampled = time.monotonic(), self.engine.tokens_sampled
        for seq in self.engine.step():
            self._finish(seq)
        tokens = self.engine.tokens_sampled - sampled
        if self.token_delay_s:  # outside the engine lock: a weight update still lands between two steps
            time.sleep(self.token_delay_s * tokens)
        self.decode.record(tokens, time.monotonic() - tic)

    def _take_prompts(self) -> None:
        """Pull prompt groups (one per store entry) into free engine slots, as many as ``_groups_within_budget`` allows.

        A worker pulls only for itself and only what it can start now, so prompts go to whichever worker has
        room first: a faster one frees room sooner and, with ``rollout.inflight_budget_s``, is allowed more.
        """
        free_groups = self._free_groups()
        if free_groups <= 0:
            return
        idle = self.engine.num_unfinished() == 0
        now = time.monotonic()
        if not idle and not self._poll_now and now < self._next_poll:
            return  # nothing new since the last empty read: poll at most every BUSY_POLL_S, not every engine step
        self._next_poll, self._poll_now = now + BUSY_POLL_S, False
        count = min(free_groups, self._groups_within_budget(idle))
        if count <= 0:
            return
        block_ms = 200 if idle else 0
        entries = self.store.read(Streams.PROMPTS, Groups.ROLLOUT, self.worker_id, count=count, block_ms=block_ms)
        # The controller pushes prompts one entry at a time: a read that woke on the first of a burst would
        # otherwise leave the engine a single group until the next timed poll, a whole wave on a small model.
        self._poll_now = len(entries) > 0
        for entry in entries:
            rows = entry.table.to_pylist()
            self.entry_groups[entry.id] = len(rows)
            for row in rows:
                self._add_group(entry.id, row)

    def _free_groups(self) -> int:
        """Groups the engine has room for now: ``max_num_seqs`` less the unfinished samples (queued, running or between
        turns), counted per sample, so a group's finished samples free their slots before its last one ends. A group
        may take the last few free slots: its other samples wait in the engine's queue for the next slot to free, as
        bare vLLM's ``n`` samples of a prompt do, instead of leaving slots empty until a whole group fits."""
        rc = self.cfg.rollout
        unfinished = sum(group.size - len(group.done) for group in self.groups.values())
        return -(-(rc.max_num_seqs - unfinished) // rc.group_size)

    def _reclaim(self) -> int:
        """Take back the prompt entries this worker id read and never acknowledged: Ray restarts a killed
        worker's actor under the same id, so what the dead process held is its own backlog. Groups of an
        entry that reached the store before the kill (listed by ``_flush``) are not generated again."""
        entries = self.store.claim_stale(
            Streams.PROMPTS, Groups.ROLLOUT, self.worker_id, min_idle_ms=0, count=1000, owner=self.worker_id
        )
        for entry in entries:
            put = self.store.get_value(_put_marker(entry.id), [])
            rows = [row for row in entry.table.to_pylist() if row["prompt_id"] not in put]
            if not rows:
                self.store.ack(Streams.PROMPTS, Groups.ROLLOUT, [entry.id])
                self.store.delete_value(_put_marker(entry.id))
                continue
            self.entry_groups[entry.id] = len(rows)
            self.entry_put[entry.id] = list(put)
            for row in rows:
                self._add_group(entry.id, row)
        if entries:
            log.warning("rollout worker %s took back %d prompt entries it held", self.worker_id, len(entries))
            self.store.incr("prompts_reclaimed", len(entries))
        return len(entries)

    def _groups_within_budget(self, idle: bool) -> int:
        """Groups this worker may take now under ``rollout.inflight_budget_s`` (see ``groups_within_budget``)."""
        rc = self.cfg.rollout
        if not rc.inflight_budget_s:
            return rc.max_num_seqs
        pending = self.engine.pending_tokens()
        return groups_within_budget(
            rc.inflight_budget_s, self.decode.tokens_per_s, pending, rc.group_size * rc.max_new_tokens, idle
        )

    def _add_group(self, entry_id: str, row: dict) -> None:
        rc = self.cfg.rollout
        group_id = f"{row['prompt_id']}-{self.worker_id}-{time.monotonic_ns()}"
        self.groups[group_id] = _Group(entry_id, row["prompt_id"], row["prompt_text"], row["answer"], rc.group_size)
        budget = length_budget(rc, self.cfg.run.seed, row["prompt_id"])
        if self.turns is not None:
            for j in range(rc.group_size):
                self.turns.start(f"{group_id}:{j}", row["prompt_text"], {"answer": row["answer"]}, budget)
            return
        # The controller sends token ids (asyncrl.data.TokenizedPrompts); a row without them is encoded here.
        prompt_ids = row["prompt_ids"] or encode_prompt(self.tokenizer, row["prompt_text"], self.cfg.data)
        # One request of n=group_size, as bare vLLM samples a group: vLLM processes the prompt once, not G times.
        self.engine.add_samples(
            group_id, prompt_ids, rc.group_size, max_new_tokens=budget, temperature=rc.temperature, top_p=rc.top_p
        )

    def _finish(self, seq) -> None:
        if self.turns is not None and (seq := self.turns.advance(seq)) is None:
            return  # the episode goes on: its next turn is queued
        group_id = seq.request_id.rpartition(":")[0]
        group = self.groups[group_id]
        group.done.append(seq)
        self._poll_now = True  # a slot is free: look for prompts before the next step
        if len(group.done) == group.size:
            del self.groups[group_id]
            self._push(group_id, group)

    def _push(self, group_id: str, group: _Group) -> None:
        """Score a finished group and queue it for the store (``_flush`` puts the queue as one message); with
        ``stages.reward`` the group goes unscored, with the prompt text and answer the reward stage needs."""
        rows = [
            {
                "sample_id": seq.request_id,
                "prompt_id": group.prompt_id,
                "group_id": group_id,
                "prompt_ids": seq.prompt_ids,
                "response_ids": seq.response_ids,
                "behavior_logprobs": seq.logprobs,
                "token_versions": seq.token_versions,
                "version_start": min(seq.token_versions, default=self.engine.version),
                "version_end": max(seq.token_versions, default=self.engine.version),
                "finish_reason": seq.finish_reason,
                "worker_id": self.worker_id,
                "gen_seconds": seq.gen_seconds,
                "loss_mask": getattr(seq, "loss_mask", None),  # multi-turn: observation tokens are 0
            }
            for seq in group.done
        ]
        if self.cfg.stages.reward:
            for row in rows:
                row.update(prompt_text=group.prompt_text, answer=group.answer)
        else:
            for row, scored in zip(rows, self._score(group), strict=True):
                row.update(reward=scored.reward, reward_failed=scored.failed, reward_error=scored.error)
                row["reward_components"] = scored.components
        self.outbox.append((rows, group.entry_id))
        if self.cfg.store.rows_per_message and self._outbox_full():
            self._flush()

    def _score(self, group: _Group) -> list:
        if self.turns is not None:  # an episode's reward is its environment's
            return [seq.scored for seq in group.done]
        texts = [self.tokenizer.decode(seq.response_ids, skip_special_tokens=True) for seq in group.done]
        return self.reward.score_batch([group.prompt_text] * len(texts), texts, [{"answer": group.answer}] * len(texts))

    def _outbox_full(self) -> bool:
        # With rows_per_message 0 the loop flushes after every engine step: the groups that finished
        # in the same step share one message (one store round trip), and none waits for another.
        return sum(len(rows) for rows, _ in self.outbox) >= self.cfg.store.rows_per_message

    def _flush(self) -> None:
        """Hand the scored groups waiting in the outbox to the writer thread as one Arrow message
        (``store.rows_per_message``), with the prompt entries all of whose groups are then in the store (acknowledged
        after the put). The next engine step overlaps the store round trips."""
        # One table for the whole message, built from the rows at once (not one per group, then concatenated).
        schema = GENERATED_SCHEMA if self.cfg.stages.reward else TRAJECTORY_SCHEMA
        table = table_from_rows([row for rows, _ in self.outbox for row in rows], schema)
        finished, partial = [], set()
        for rows, entry_id in self.outbox:
            self.entry_groups[entry_id] -= 1
            if self.entry_groups[entry_id] == 0:
                del self.entry_groups[entry_id]
                finished.append(entry_id)
            else:
                self.entry_put.setdefault(entry_id, []).append(rows[0]["prompt_id"])
                partial.add(entry_id)
        self.outbox = []
        # A restarted worker takes back the entries it held: it must know which of their groups are in the store.
        markers = {entry_id: list(self.entry_put[entry_id]) for entry_id in partial - set(finished)}
        cleared = [entry_id for entry_id in finished if self.entry_put.pop(entry_id, None) is not None]
        self.writer.submit(functools.partial(self._write, table, markers, finished, cleared), self._stop)

    def _write(self, table: pa.Table, markers: dict, finished: list[str], cleared: list[str], store) -> None:
        """On the writer thread: put ``table``, count its tokens, record which groups of still open prompt entries
        are put (``markers``), then acknowledge the ``finished`` entries and drop their markers (``cleared``)."""
        tokens = pc.sum(pc.list_value_length(table.column("response_ids"))).as_py() or 0
        waited = store.put_wait_s
        store.put(self.output, table, {"rows": table.num_rows, "tokens": tokens})
        store.incr("rollout_tokens", tokens)
        if store.put_wait_s > waited:  # the trajectories stream was full: back-pressure, as a metric
            store.incr("put_wait_ms", round(1000 * (store.put_wait_s - waited)))
        for entry_id, put in markers.items():
            store.set_value(_put_marker(entry_id), put)
        if finished:
            store.ack(Streams.PROMPTS, Groups.ROLLOUT, finished)
            for entry_id in cleared:
                store.delete_value(_put_marker(entry_id))


class _Writer:
    """A thread that runs a rollout worker's store writes one at a time, in the order handed over.

    Consumes write jobs from a bounded queue (``FLUSH_QUEUE``); waits on that queue, unblocked by ``submit`` or
    ``close``. A job that raises stops the writing: the error is kept, and the generation loop raises it at its next
    turn (``raise_error``), its fault boundary. It has a store client of its own (its own connection).
    """

    def __init__(self, store, name: str) -> None:
        self.store = store
        self.error: BaseException | None = None
        self._jobs: queue.Queue = queue.Queue(maxsize=FLUSH_QUEUE)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job, stop: threading.Event) -> None:
        """Queue ``job(store)``; waits while the queue is full (a put waiting for room in the store), until the
        writer fails (raises its error) or ``stop`` is set (the job is dropped: its prompt entries stay unacknowledged,
        for a restarted worker to take back)."""
        while not stop.is_set():
            self.raise_error()
            try:
                self._jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError("the rollout worker's store writer failed") from self.error

    def close(self, timeout_s: float) -> None:
        """Write what was handed over, at most ``timeout_s`` more, then end the thread and its connection."""
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._jobs.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.store.close()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.error is not None:
                continue  # a failed writer writes nothing more: later puts must not overtake the failed one
            try:
                job(self.store)
            except BaseException as err:  # handed to the generation loop, the fault boundary
                log.exception("rollout store writer %s failed", self._thread.name)
                self.error = err


def _put_marker(entry_id: str) -> str:
    """Store value listing the prompt ids of a prompt entry whose groups are already put (while others are not)."""
    return f"rollout_put:{entry_id}"


def _worker_index(worker_id: str) -> int:
    """The ``i`` of ``rollout-<i>`` (0 for an id without a trailing number): its ``rollout.debug_token_delay_s`` entry."""
    match = re.search(r"(\d+)$", worker_id)
    return int(match.group(1)) if match else 0


def _tensor_parallel(cfg: Config, worker_id: str) -> int:
    """``resources.pools[i].tensor_parallel`` of the pool this worker (``rollout-<i>``) belongs to."""
    from asyncrl.weight_sync import pool_links

    index = _worker_index(worker_id)
    return next((link.tensor_parallel for link in pool_links(cfg) if index in link.engines), 1)
