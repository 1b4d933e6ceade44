"""An in-process vLLM engine driven step by step by one owner.

The owner (a rollout worker's generation loop) calls ``add_request`` and ``step``; another thread
may call ``update_weights`` at any time. One lock guards every call into vLLM, so a weight update
lands between two engine steps, never inside one, and every sampled token is tagged with the
policy version that was live during the step that sampled it (``token_versions``).

Behaviour log-probs are those of the distribution actually sampled from: the engine runs with
``logprobs_mode="processed_logprobs"``, so at temperature T (top_p 1) each log-prob equals
``log_softmax(logits / T)`` of the sampled token.

vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weight tensors are
handed to the worker by reference, without serialization.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# How long a step waits for a pending weight update before declaring the engine stuck.
UPDATE_WAIT_TIMEOUT_S = 600.0


@dataclass
class FinishedSequence:
    """One sampled response, as it left the engine."""

    request_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token (behaviour log-probs)
    token_versions: list[int]  # the engine's weight version when each token was sampled
    finish_reason: str  # "stop" | "length" | "abort"
    gen_seconds: float


@dataclass(slots=True)
class _RunningSequence:
    prompt_ids: list[int]
    started_at: float
    max_new_tokens: int
    engine_id: str  # vLLM's internal request id (the caller's id plus a random suffix; a group's sample: its child's)
    sampled: int = 0  # tokens sampled as of the last step
    group: Any = None  # a sample of ``add_samples``: vLLM's ParentRequest, which keeps each finished child's output
    index: int = 0  # the sample's index in its group
    version_marks: list[tuple[int, int]] = field(default_factory=list)
    """``(first token, version)`` from each weight version on: token ``i`` carries the last mark at or before it."""

    def finish(self, request_id: str, finish_reason: str, token_ids, logprobs) -> FinishedSequence:
        """The finished sequence from vLLM's tokens and per-position log-prob dicts."""
        response_ids = list(token_ids)
        return FinishedSequence(
            request_id=request_id,
            prompt_ids=self.prompt_ids,
            response_ids=response_ids,
            logprobs=[position[t].logprob for t, position in zip(response_ids, logprobs, strict=True)],
            token_versions=self.token_versions(len(response_ids)),
            finish_reason=finish_reason,
            gen_seconds=time.perf_counter() - self.started_at,
        )

    def token_versions(self, tokens: int) -> list[int]:
        ends = [start for start, _ in self.version_marks[1:]] + [tokens]
        versions: list[int] = []
        for (start, version), end in zip(self.version_marks, ends, strict=True):
            versions.extend([version] * (end - start))
        return versions


def engine_kwargs(
    model_path: str,
    *,
    dtype: str,
    max_model_len: int,
    max_num_seqs: int,
    kv_cache_mb: int,
    seed: int,
    prefix_caching: bool,
    enforce_eager: bool,
    tensor_parallel: int = 1,
) -> dict[str, Any]:
    """vLLM engine arguments as every engine of ours sets them (the bench baseline uses the same ones)."""
    # TP > 1: vLLM's TP workers are processes of their own; this process keeps the engine core and its lock.
    parallel = {"tensor_parallel_size": tensor_parallel, "distributed_executor_backend": "mp"}
    return {
        **(parallel if tensor_parallel > 1 else {}),
        "model": model_path,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "kv_cache_memory_bytes": kv_cache_mb << 20,
        "seed": seed,
        "logprobs_mode": "processed_logprobs",  # behaviour log-probs of the distribution actually sampled
        "enable_prefix_caching": prefix_caching,
        "enforce_eager": enforce_eager,
        "disable_log_stats": True,
    }


class GenerationEngine:
    """A vLLM ``LLMEngine`` in this process, with atomic weight updates and per-token versions.

    Thread safety: every public method takes ``self._lock``. ``update_weights`` additionally raises a
    gate that makes ``step`` wait, so a tight generation loop cannot starve a pending update (a
    plain ``threading.Lock`` is not fair: the stepping thread re-acquires it before the waiter wakes).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 512,
        max_num_seqs: int = 64,
        kv_cache_mb: int = 256,
        seed: int = 0,
        version: int = 0,
        recompute_kv_on_update: bool = True,
        enforce_eager: bool = True,
        staged_updates: bool = True,
        tensor_parallel: int = 1,
    ):
        """Start the engine on ``model_path`` (a Hugging Face folder).

        ``recompute_kv_on_update``: after a weight update, drop the KV cache of running requests so
        they are re-prefilled (prompt + tokens so far) with the new weights; every later token is
        then exactly a sample of the new policy. Without it, running requests keep attending to
        keys/values computed by the old weights, and the prefix cache is disabled because it
        could not be invalidated while requests hold blocks.
        ``enforce_eager``: run without torch.compile (the CPU default is inductor, slow to start).
        ``staged_updates``: prepare each weight update beside the live model while it keeps stepping and
        swap it in between two steps (``rollout.staged_weights``); False: vLLM's reload, under the lock.
        ``tensor_parallel``: vLLM's ``tensor_parallel_size``; such an engine is updated by ``update_weight_shards``.
        """
        # Must be set before vLLM reads its environment: the engine core must live in this process
        # so the lock below really brackets engine steps and tensors pass by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        if dtype == "bfloat16":
            from rollout.cpu_amx import allow_amx

            allow_amx()  # vLLM's CPU bfloat16 attention runs AMX tiles, which this process must ask for first
        started = time.perf_counter()
        self.version = version
        self._recompute_kv_on_update = recompute_kv_on_update
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()
        # A TP engine's full-tensor update (update_weights) goes through vLLM's reload, which shards in each worker.
        self._staged_updates = staged_updates and tensor_parallel == 1
        self._staged = None  # rollout.staged_weights.StagedWeights, built at the first update
        self._no_update_pending = threading.Condition(threading.Lock())
        self._pending_updates = 0
        self._running: dict[str, _RunningSequence] = {}
        self._aborted: list[FinishedSequence] = []
        self.tokens_sampled = 0  # since start, every request's; a rollout worker's decode rate counts them
        self._marked_version = version  # the version whose start the running sequences' version_marks hold
        args = EngineArgs(
            **engine_kwargs(
                model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                kv_cache_mb=kv_cache_mb,
                seed=seed,
                prefix_caching=recompute_kv_on_update,
                enforce_eager=enforce_eager,
                tensor_parallel=tensor_parallel,
            )
        )
        self._engine = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_ExpectedReloadWarnings())
        self._engine.set_weight_version(str(version))
        self.init_seconds = time.perf_counter() - started

    @property
    def recompute_kv_on_update(self) -> bool:
        """Whether a weight update re-prefills running requests by default (see ``__init__``)."""
        return self._recompute_kv_on_update

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> None:
        """Queue one sample of ``prompt_ids``; its tokens arrive through ``step``."""
        self._add(request_id, [request_id], prompt_ids, max_new_tokens, temperature, top_p, seed)

    def add_samples(
        self,
        group_id: str,
        prompt_ids: list[int],
        samples: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """Queue ``samples`` samples of ``prompt_ids`` as one vLLM request with ``n=samples`` (its parallel sampling,
        as bare ``LLM.generate`` runs a group: the prompt is processed once, not once per sample); returns the sample
        ids, ``f"{group_id}:{j}"``. Each sample finishes through ``step`` on its own, as a request of its own would
        (a group's early finishers free their slots), and can be aborted on its own. ``seed``: sample j gets seed + j.
        """
        sample_ids = [f"{group_id}:{j}" for j in range(samples)]
        return self._add(group_id, sample_ids, prompt_ids, max_new_tokens, temperature, top_p, seed)

    def _add(
        self,
        request_id: str,
        sample_ids: list[str],
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[str]:
        """One vLLM request for ``sample_ids`` (n = their count) under the caller's ``request_id``."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if any(sample_id in self._running for sample_id in sample_ids):
            raise ValueError(f"request {request_id!r} is already running")
        samples = len(sample_ids)
        params = SamplingParams(
            n=samples,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            logprobs=0,  # just the sampled token's log-prob
            # Tokens come back once, at the end: vLLM builds no per-step output per request (~0.3 ms a step of
            # 32 on a tiny model); version tags come from the per-sequence marks each version switch leaves.
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,
        )
        prompt_ids = list(prompt_ids)  # one copy, shared by the group's samples (never written to)
        with self._lock:
            engine_id = self._engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
            started = time.perf_counter()
            if samples == 1:
                children = [(engine_id, None)]
            else:
                # vLLM names sample j's child request f"{j}_{parent id}" (ParentRequest.get_child_info)
                states = self._engine.output_processor.request_states
                children = [(child, states[child].parent_req) for child in (f"{j}_{engine_id}" for j in range(samples))]
            for index, (sample_id, (child, group)) in enumerate(zip(sample_ids, children, strict=True)):
                sequence = _RunningSequence(prompt_ids, started, max_new_tokens, child, group=group, index=index)
                sequence.version_marks.append((0, self.version))
                self._running[sample_id] = sequence
        return sample_ids

    def step(self) -> list[FinishedSequence]:
        """Run one engine step; return the sequences that finished in it (and any aborted since).

        Waits while a weight update is pending, then holds the lock for the whole step, so all
        tokens sampled in this step carry the same version.
        """
        with self._no_update_pending:
            if not self._no_update_pending.wait_for(lambda: self._pending_updates == 0, UPDATE_WAIT_TIMEOUT_S):
                raise TimeoutError(f"a weight update has been pending for over {UPDATE_WAIT_TIMEOUT_S} s")
        with self._lock:
            finished, self._aborted = self._aborted, []
            if not self._engine.has_unfinished_requests():
                return finished
            if self.version != self._marked_version:  # weights switched since the last step: later tokens are new
                for sequence in self._running.values():
                    sequence.version_marks.append((self._sampled(sequence), self.version))
                self._marked_version = self.version
            for output in self._engine.step():
                sequence = self._running.get(output.request_id)
                # None: aborted by us after the engine produced it, or a group's output (its samples are taken below)
                if sequence is None or sequence.group is not None or not output.finished:
                    continue
                completion = output.outputs[0]
                del self._running[output.request_id]
                finished.append(
                    sequence.finish(
                        output.request_id,
                        completion.finish_reason or "abort",
                        completion.token_ids,
                        completion.logprobs,
                    )
                )
                self.tokens_sampled += len(completion.token_ids) - sequence.sampled
            states, ended = self._engine.output_processor.request_states, []
            for request_id, sequence in self._running.items():
                state = states.get(sequence.engine_id)
                if state is None and sequence.group is not None:  # a group's sample that finished in this step
                    ended.append(request_id)
                    continue
                sampled = len(state.detokenizer.token_ids)
                self.tokens_sampled += sampled - sequence.sampled
                sequence.sampled = sampled
            for request_id in ended:
                sequence = self._running.pop(request_id)
                completion = sequence.group.output_aggregator[sequence.index]
                reason = completion.finish_reason or "abort"
                finished.append(sequence.finish(request_id, reason, completion.token_ids, completion.logprobs))
                self.tokens_sampled += len(completion.token_ids) - sequence.sampled
            return finished

    def _sampled(self, sequence: _RunningSequence) -> int:
        """Tokens a running sequence has sampled so far (vLLM's output state of the request; caller holds the lock)."""
        return len(self._engine.output_processor.request_states[sequence.engine_id].detokenizer.token_ids)

    def num_unfinished(self) -> int:
        """Requests still generating plus aborted ones that the next ``step`` will hand back."""
        with self._lock:
            return len(self._running) + len(self._aborted)

    def pending_tokens(self) -> int:
        """Tokens the running requests may still sample: the rest of each one's ``max_new_tokens`` (an upper bound,
        a request can stop early)."""
        with self._lock:
            return sum(seq.max_new_tokens - seq.sampled for seq in self._running.values())

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests; their partial responses come back from the next ``step``
        with ``finish_reason="abort"``. Unknown or already finished ids are ignored."""
        with self._lock:
            known = [request_id for request_id in request_ids if request_id in self._running]
            processor = self._engine.output_processor
            engine_ids = []
            for request_id in known:
                sequence = self._running.pop(request_id)
                state = processor.request_states[sequence.engine_id]
                logprobs = state.logprobs_processor.logprobs
                self._aborted.append(sequence.finish(request_id, "abort", state.detokenizer.token_ids, logprobs))
                engine_ids.append(sequence.engine_id)
                if sequence.group is not None:  # the group's siblings go on; it must not wait for this one
                    sequence.group.child_requests.discard(sequence.engine_id)
                    if not sequence.group.child_requests:
                        processor.parent_requests.pop(sequence.group.request_id, None)
            # By vLLM's own ids: a group's samples share the caller's id, and one sample is aborted alone.
            self._engine.abort_request(engine_ids, internal=True)

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *, recompute_kv: bool | None = None
    ) -> float:
        """Load Hugging Face-named tensors into the live engine between two steps; return seconds.

        ``named_tensors`` is the full parameter set as ``model.named_parameters()`` of the
        transformers model yields it (a tied ``lm_head.weight`` may be present or not: vLLM's
        loader skips it). Running requests continue; their later tokens carry ``version``.
        Pass received tensors, not a lazy network read. With staged updates the engine keeps stepping
        while they are copied beside the live model and pauses only for the swap (milliseconds);
        vLLM's reload (a model the staging cannot map) pauses it for the whole load.
        ``recompute_kv``: this update's choice instead of ``recompute_kv_on_update``; an engine built with
        recompute (prefix cache on) must recompute, since its cache could hold old weights' blocks.
        """
        if recompute_kv is None:
            recompute_kv = self._recompute_kv_on_update
        if self._recompute_kv_on_update and not recompute_kv:
            raise ValueError("recompute_kv=False needs an engine built with recompute_kv_on_update=False")
        named_tensors = list(named_tensors)
        with self._update_lock:  # one update at a time: they share the spare buffers
            staged = self._prepare_staged(named_tensors)
            with self._no_update_pending:
                self._pending_updates += 1
            try:
                return self._switch(named_tensors, version, staged, recompute_kv)
            finally:
                with self._no_update_pending:
                    self._pending_updates -= 1
                    self._no_update_pending.notify_all()

    def _prepare_staged(self, named_tensors: list[tuple[str, torch.Tensor]]) -> bool:
        """Stage the update beside the live model (no engine lock: steps go on); False: use vLLM's reload."""
        from rollout.staged_weights import StagedWeights, StagingUnsupported

        if not self._staged_updates:
            return False
        try:
            if self._staged is None or self._staged.names != {name for name, _ in named_tensors}:
                workers = self._engine.vllm_config.parallel_config.world_size
                if workers != 1:  # workers in other processes: their models are not reachable from here
                    raise StagingUnsupported(f"{workers} vLLM workers; staging needs the one in this process")
                with self._lock:
                    (model,) = self._engine.collective_rpc(_model_on_worker)
                self._staged = StagedWeights(model, [(name, tuple(t.shape)) for name, t in named_tensors])
            self._staged.prepare(named_tensors)
            return True
        except StagingUnsupported as err:
            log.warning("weight updates use vLLM's reload (%s)", err)
            self._staged_updates, self._staged = False, None
            return False

    def _switch(
        self, named_tensors: list[tuple[str, torch.Tensor]], version: int, staged: bool, recompute_kv: bool
    ) -> float:
        """Make the update live between two steps (the caller raised the update gate); seconds under the lock."""
        with self._lock:
            started = time.perf_counter()
            if staged:
                self._staged.commit()
            else:
                self._engine.collective_rpc(_reload_weights_on_worker, args=(named_tensors,))
            # Cached KV was computed by the old weights. With recompute, running requests are preempted and
            # re-prefilled by the new weights and the prefix cache empties. Without, the engine has no prefix
            # cache (see __init__) and running requests keep their blocks: nothing to reset (vLLM's reset would
            # only fail on those blocks, with a warning under the lock at every sync).
            if recompute_kv and not self._engine.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError("vLLM could not reset its KV cache after a weight update")
            self.version = version
            self._engine.set_weight_version(str(version))
            return time.perf_counter() - started

    def update_weight_shards(self, shards_by_rank: list[list[tuple[str, torch.Tensor]]], version: int) -> float:
        """A tensor-parallel engine's update: ``shards_by_rank[r]`` holds TP rank r's shard of every tensor
        (checkpoint names, ``asyncrl.sync.tp_layout``), which vLLM's worker r stages and swaps in; between two
        steps, like ``update_weights``; returns seconds under the lock."""
        with self._update_lock:
            with self._no_update_pending:
                self._pending_updates += 1
            try:
                with self._lock:
                    started = time.perf_counter()
                    self._engine.collective_rpc(_load_shards_on_worker, args=(shards_by_rank,))
                    recompute = self._recompute_kv_on_update  # without: no prefix cache, nothing to reset (_switch)
                    if recompute and not self._engine.reset_prefix_cache(reset_running_requests=True):
                        raise RuntimeError("vLLM could not reset its KV cache after a weight update")
                    self.version = version
                    self._engine.set_weight_version(str(version))
                    return time.perf_counter() - started
            finally:
                with self._no_update_pending:
                    self._pending_updates -= 1
                    self._no_update_pending.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold ``step`` (it waits as for a pending update) while the block runs; an
        ``update_weights`` inside it runs as usual. For ``sync.mode=pause``: no token is sampled
        between the first bucket of a sync and the switch."""
        with self._no_update_pending:
            self._pending_updates += 1
        try:
            yield
        finally:
            with self._no_update_pending:
                self._pending_updates -= 1
                self._no_update_pending.notify_all()

    def close(self) -> None:
        """Abort everything and release the engine (its memory goes when the last reference does)."""
        with self._lock:
            if self._running:
                self._engine.abort_request([sequence.engine_id for sequence in self._running.values()], internal=True)
            self._running.clear()
            self._aborted.clear()
            engine, self._engine = self._engine, None
            if engine is not None:
                engine.engine_core.shutdown()
                del engine


class _ExpectedReloadWarnings(logging.Filter):
    """Hide vLLM's reload warning for layers that have no checkpoint weights of their own.

    Rotary embeddings hold only derived buffers, and a tied LM head shares the embedding's
    weight, so on every reload vLLM reports them as "Failed to load weights". Any other layer
    named in that warning is a real problem and still shows.
    """

    NO_OWN_WEIGHTS = frozenset({"RotaryEmbedding", "ParallelLMHead"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.NO_OWN_WEIGHTS
        )


def _model_on_worker(worker: Any) -> Any:
    """Runs inside the vLLM worker (this process): the live model module."""
    return worker.model_runner.get_model()


def _reload_weights_on_worker(worker: Any, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the vLLM worker (this process): reload checkpoint-format weights in place."""
    from vllm.platforms import current_platform

    worker.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
    if current_platform.is_cpu():
        _refresh_cpu_embedding_gemm(worker.model_runner.get_model())


def _load_shards_on_worker(worker: Any, shards_by_rank: list[list[tuple[str, torch.Tensor]]]) -> None:
    """Runs in vLLM TP worker r: load shard list r into its part of the model (the map is built once)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    from rollout.staged_weights import StagedWeights

    named = shards_by_rank[get_tensor_model_parallel_rank()]
    staged = getattr(worker, "asyncrl_staged", None)
    if staged is None or staged.names != {name for name, _ in named}:
        model = worker.model_runner.get_model()
        staged = worker.asyncrl_staged = StagedWeights(model, [(name, tuple(t.shape)) for name, t in named])
    staged.prepare(named)
    staged.commit()


def _refresh_cpu_embedding_gemm(model: Any) -> None:
    """CPU-only fix: rebuild the matmul handle of embeddings and (tied or not) LM heads.

    vLLM's CPU backend gives each vocab embedding a GEMM handle (oneDNN or a packed copy) for the
    LM-head matmul. A layerwise reload builds that handle on a temporary tensor, then copies the
    values back into the original parameter, so the handle no longer sees the live weights and
    logits silently go wrong (~0.13 log-prob error). Re-dispatching on the live parameter fixes it.
    A CUDA engine has no such handle and skips this.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
