"""`asyncrl bench train`: our trainer path against bare DeepSpeed, same model, batches and ZeRO stage.

Baseline: a plain DeepSpeed loop (``deepspeed.initialize`` with the config ``PolicyTrainer``
uses, a torch AdamW) over micro-batches already collated into tensors in memory: forward,
``sequence_logprobs`` over the response window, the configured policy loss (PPO-clip by
default), ``engine.backward``, ``engine.step``. Ours: one ``TrainerWorker`` in this process (no
Ray) running ``train_step`` on the same trajectories, put in an embedded store as the rollout
worker puts them (whole groups, ``store.rows_per_message`` rows per message): store read, Arrow
decode, staleness check, advantages, ledger, collate, then the same compute. So the ratio is
the cost of our layers around the same forward/backward/step.

The trajectories have the config's shapes: prompts from the data source through the chat
template, ``rollout.max_new_tokens`` random response tokens, ``trainer.prompts_per_step x
rollout.group_size`` samples per optimizer step, random rewards (so advantages are not all 0).
Both engines live in this process and run alternately, with ``trainer.threads`` threads.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import pyarrow as pa

from asyncrl.bench.memory import own_peak_rss_mb, server_peak_rss_mb
from asyncrl.bench.pairs import pairs_line
from asyncrl.config import Config, ConfigError
from asyncrl.types import TRAJECTORY_SCHEMA, Streams

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, slots=True)
class Measurement:
    """One timed run: ``steps`` optimizer steps."""

    steps: int
    tokens: int  # trained (response) tokens
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True, slots=True)
class Workload:
    steps: list[list[pa.Table]]
    """Per optimizer step, the store messages the rollout worker would put (whole groups each)."""
    micro_batches: list[list[dict[str, Tensor]]]
    """Per optimizer step, the same rows collated into the micro-batches the trainer will form."""
    tokens_per_step: int


def build_workload(cfg: Config, tokenizer, num_steps: int) -> Workload:
    """``num_steps`` steps of trajectories with the config's shapes; seeded."""
    from asyncrl.data import build_prompt_source, encode_prompt
    from trainers.batch import collate, with_advantages
    from trainers.worker import build_scoring

    rc, tc = cfg.rollout, cfg.trainer
    rng = np.random.default_rng(cfg.run.seed)
    source = build_prompt_source(cfg.data)
    scoring = build_scoring(cfg)
    pad_id = tokenizer.pad_token_id or 0
    groups_per_message = max(1, -(-cfg.store.rows_per_message // rc.group_size))
    steps, micro_batches = [], []
    for step in range(num_steps):
        groups = []
        for index in range(step * tc.prompts_per_step, (step + 1) * tc.prompts_per_step):
            prompt_ids = encode_prompt(tokenizer, source[index].text, cfg.data)
            groups.append(_group(f"g{index}", f"p{index}", prompt_ids, rc.group_size, rc.max_new_tokens, rng))
        steps.append(
            [pa.concat_tables(groups[i : i + groups_per_message]) for i in range(0, len(groups), groups_per_message)]
        )
        scored = pa.concat_tables([with_advantages(group, scoring) for group in groups])
        micro = tc.micro_batch_size
        micro_batches.append([collate(scored.slice(i, micro), pad_id) for i in range(0, scored.num_rows, micro)])
    # Every response has max_new_tokens tokens, so every step trains the same number.
    return Workload(steps, micro_batches, cfg.samples_per_step * rc.max_new_tokens)


def _group(group_id: str, prompt_id: str, prompt_ids: list[int], size: int, length: int, rng) -> pa.Table:
    responses = rng.integers(0, 256, (size, length), dtype=np.int32)  # byte-range ids exist in every vocabulary
    columns = {
        "sample_id": [f"{group_id}:{j}" for j in range(size)],
        "prompt_id": [prompt_id] * size,
        "group_id": [group_id] * size,
        "prompt_ids": [prompt_ids] * size,
        "response_ids": responses.tolist(),
        "behavior_logprobs": (-rng.exponential(1.0, (size, length))).astype(np.float32).tolist(),
        "token_versions": [[0] * length] * size,
        "version_start": [0] * size,
        "version_end": [0] * size,
        "reward": rng.integers(0, 2, size).astype(np.float32).tolist(),
        "reward_failed": [False] * size,
        "reward_error": [None] * size,
        "reward_components": [[] for _ in range(size)],
        "finish_reason": ["length"] * size,
        "worker_id": ["bench-0"] * size,
        "gen_seconds": [0.1] * size,
        "loss_mask": [None] * size,
    }
    return pa.Table.from_pydict(columns, schema=TRAJECTORY_SCHEMA)


class BareDeepSpeed:
    """The baseline: a DeepSpeed engine on the same model and config, fed tensors already in memory."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        from asyncrl.algorithms.registry import get_policy_loss
        from trainers.policy import DTYPES, deepspeed_config, init_distributed, select_placement
        from trainers.worker import build_loss_config

        tc = cfg.trainer
        dtype = DTYPES[cfg.model.dtype]
        init_distributed(select_placement(0).dist_backend)  # a no-op when our trainer already made the group
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        config = deepspeed_config(
            micro_batch_size=tc.micro_batch_size,
            grad_accum_steps=cfg.samples_per_step // tc.micro_batch_size,
            grad_clip=tc.grad_clip,
            zero_stage=tc.zero_stage,
            bf16=dtype == torch.bfloat16,
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine.train()
        self.loss_fn = get_policy_loss(tc.loss)
        self.loss_config = build_loss_config(cfg)
        self.temperature = cfg.rollout.temperature

    def run(self, work: Workload) -> Measurement:
        import torch

        from asyncrl.algorithms.logprobs import sequence_logprobs
        from asyncrl.algorithms.loss import LossInputs

        engine, device = self.engine, self.engine.device
        started = time.perf_counter()
        for micro_batches in work.micro_batches:
            for batch in micro_batches:
                input_ids, mask = batch["input_ids"].to(device), batch["response_mask"].to(device)
                length = input_ids.shape[1]
                keep = min(length, length - int(mask.argmax(dim=1).min()) + 1)  # the response window
                logits = engine(
                    input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), logits_to_keep=keep
                ).logits
                window = sequence_logprobs(logits, input_ids[:, -keep:], mask[:, -keep:], self.temperature)
                inputs = LossInputs(
                    logprobs=torch.nn.functional.pad(window, (length - keep, 0)),
                    behavior_logprobs=batch["behavior_logprobs"].to(device),
                    advantages=batch["advantages"].to(device),
                    mask=mask,
                )
                loss, _ = self.loss_fn(inputs, self.loss_config)
                engine.backward(loss)
                engine.step()  # DeepSpeed updates at the accumulation boundary
        seconds = time.perf_counter() - started
        return Measurement(len(work.micro_batches), work.tokens_per_step * len(work.micro_batches), seconds)


class InProcessTrainer:
    """Ours: one ``TrainerWorker`` in this process reading the steps' groups from the store."""

    def __init__(self, cfg: Config, model_path: str, url: str) -> None:
        from storage import TrajectoryStore
        from trainers.worker import TrainerWorker

        self.producer = TrajectoryStore.from_config(url, cfg.run.name, cfg.store)
        self.worker = TrainerWorker(cfg, model_path, url)

    def run(self, work: Workload) -> Measurement:
        """Put every step's messages as rollout workers would (not timed), then time ``train_step``s."""
        for messages in work.steps:
            for message in messages:
                self.producer.put(Streams.TRAJECTORIES, message, {"rows": message.num_rows})
        tokens = 0
        started = time.perf_counter()
        for _ in work.steps:
            tokens += self.worker.train_step(0)["tokens"]
        seconds = time.perf_counter() - started
        if tokens != work.tokens_per_step * len(work.steps):
            raise RuntimeError(f"ours trained {tokens} tokens, bare {work.tokens_per_step * len(work.steps)}")
        return Measurement(len(work.steps), tokens, seconds)

    def close(self) -> None:
        self.producer.purge()
        self.producer.close()
        self.worker.store.close()


def bench_train(
    cfg: Config, *, steps: int = 4, repeats: int = 3, device: str = "auto", out: TextIO = sys.stdout
) -> float:
    """Time bare DeepSpeed and our trainer alternately ``repeats`` times (``steps`` optimizer steps
    each, after one warm-up step each); print a table; return and print last the ratio of median
    trained tokens/s (ours / bare DeepSpeed)."""
    from asyncrl.runtime import worker_process_env

    threads = str(cfg.trainer.threads)
    worker_process_env(cfg.trainer.threads)
    import torch
    from transformers import AutoTokenizer

    from asyncrl.models import resolve_model_path
    from asyncrl.runtime import store_server

    actual = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("auto", actual):
        raise ConfigError(f"--device {device} requested but the trainer runs on {actual} (torch sees no GPU)")
    torch.set_num_threads(cfg.trainer.threads)
    model_path = str(resolve_model_path(cfg.model.path))
    cfg.run.name = f"bench-{uuid.uuid4().hex[:8]}"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    work = build_workload(cfg, tokenizer, steps)

    bare: list[Measurement] = []
    ours: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="asyncrl-bench-") as tmp, store_server(cfg, Path(tmp)) as url:
        trainer = InProcessTrainer(cfg, model_path, url)
        baseline = BareDeepSpeed(cfg, model_path)
        try:
            warm_up = Workload(work.steps[:1], work.micro_batches[:1], work.tokens_per_step)
            baseline.run(warm_up)  # one step each: allocator, optimizer state, DeepSpeed buffers
            trainer.run(warm_up)
            for _ in range(repeats):
                bare.append(baseline.run(work))
                ours.append(trainer.run(work))
            redis_peak = None if cfg.store.url else server_peak_rss_mb(url, cfg.store.timeout_s)
        finally:
            trainer.close()

    bare_median = statistics.median(m.tokens_per_s for m in bare)
    ours_median = statistics.median(m.tokens_per_s for m in ours)
    ratio = ours_median / bare_median
    tc, rc = cfg.trainer, cfg.rollout
    lengths = [int(batch["attention_mask"].sum(dim=1).max()) for batch in work.micro_batches[0]]
    print(
        f"asyncrl bench train: {cfg.model.path} ({model_path}) on {actual}, {cfg.model.dtype}, ZeRO-{tc.zero_stage}, "
        f"OMP_NUM_THREADS={threads}\n"
        f"{steps} optimizer steps/run of {tc.prompts_per_step} prompts x {rc.group_size} samples = "
        f"{cfg.samples_per_step} sequences (micro-batch {tc.micro_batch_size}, longest {max(lengths)} tokens, "
        f"{rc.max_new_tokens} response tokens each), loss {tc.loss}\n"
        "bare DeepSpeed = forward (response-window logits) + sequence_logprobs + loss, engine.backward, "
        "engine.step on micro-batches collated in memory\n"
        "ours = TrainerWorker.train_step in this process (no Ray): store read -> Arrow -> advantages -> "
        "collate -> the same compute -> ack\n",
        file=out,
    )
    print(f"{'run':>6} | {'bare tok/s':>10} {'s':>7} | {'ours tok/s':>10} {'s':>7}", file=out)
    for index, (b, o) in enumerate(zip(bare, ours, strict=True), start=1):
        print(
            f"{index:>6} | {b.tokens_per_s:>10.1f} {b.seconds:>7.3f} | {o.tokens_per_s:>10.1f} {o.seconds:>7.3f}",
            file=out,
        )
    print(f"{'median':>6} | {bare_median:>10.1f} {'':>7} | {ours_median:>10.1f}", file=out)
    redis_text = "n/a (external store.url)" if redis_peak is None else f"{redis_peak:.0f} MB"
    print(f"\npeak RSS: this process (both engines) {own_peak_rss_mb():.0f} MB, redis-server {redis_text}", file=out)
    print(pairs_line([m.tokens_per_s for m in ours], [m.tokens_per_s for m in bare]), file=out)
    print(f"train ratio (ours/bare DeepSpeed): {ratio:.2f}", file=out)
    return ratio
