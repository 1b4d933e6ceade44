"""A receiving engine in a child process of its own, for `asyncrl bench sync` and the sync tests.

``EngineProcess`` starts a spawned child that holds a ``GenerationEngine`` (or none: a bare
receiver that only stages buckets) and one end of a pool link, and answers commands over a pipe:
connect, sample, sync, start/stop a decode load, and report decode timestamps. The child may be
told to kill itself after staging a given bucket (``die_after_bucket``), which is how a test stops an
engine mid-sync. ``decode_cpus`` / ``sync_cpus`` pin the decode thread and the thread that receives and
stages syncs to CPUs of their own (the CPU counterpart of leaving SMs to decode). Every reply is awaited
with a timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import asdict
from typing import Any

from asyncrl.sync.transport import LinkSpec


class EngineProcessError(RuntimeError):
    """The child answered with an error, died, or did not answer in time."""


class EngineProcess:
    """Parent-side handle of one child engine (see the module docstring)."""

    def __init__(
        self,
        name: str,
        model_path: str | None,
        *,
        dtype: str = "float32",
        omp_threads: int = 1,
        die_after_bucket: int | None = None,
        recompute_kv_on_update: bool = True,
        decode_cpus: set[int] | None = None,
        sync_cpus: set[int] | None = None,
        start_timeout_s: float = 120.0,
        tensor_parallel: int = 1,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # vLLM and gloo state must not be forked
        self.name = name
        self._conn, child_conn = context.Pipe()
        self._lock = threading.Lock()
        options = {
            "dtype": dtype,
            "omp_threads": omp_threads,
            "die_after_bucket": die_after_bucket,
            "recompute_kv_on_update": recompute_kv_on_update,
            "decode_cpus": decode_cpus,
            "sync_cpus": sync_cpus,
            "tensor_parallel": tensor_parallel,
        }
        self.process = context.Process(
            target=_child_main,
            args=(child_conn, model_path, options),
            name=f"engine-{name}",
            daemon=tensor_parallel == 1,  # a TP engine starts vLLM worker processes, which a daemon may not
        )
        self.process.start()
        child_conn.close()
        self.call("ready", timeout_s=start_timeout_s)

    def call(self, command: str, *args: Any, timeout_s: float = 120.0) -> Any:
        """Send ``command`` and wait at most ``timeout_s`` for its reply."""
        with self._lock:
            self._conn.send((command, args))
            return self._reply(command, timeout_s)

    def send_only(self, command: str, *args: Any) -> None:
        """Start ``command`` without waiting; collect its reply with ``reply``."""
        self._lock.acquire()
        self._conn.send((command, args))

    def reply(self, command: str, timeout_s: float) -> Any:
        try:
            return self._reply(command, timeout_s)
        finally:
            self._lock.release()

    def _reply(self, command: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.05):
            if not self.process.is_alive():
                raise EngineProcessError(f"engine {self.name} died (exit {self.process.exitcode}) during {command}")
            if time.monotonic() > deadline:
                raise EngineProcessError(f"engine {self.name} did not answer {command} within {timeout_s}s")
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise EngineProcessError(f"engine {self.name} died during {command}") from None
        if not ok:
            raise EngineProcessError(f"engine {self.name}: {command} failed: {value}")
        return value

    def close(self, timeout_s: float = 30.0) -> None:
        # A command started with ``send_only`` whose reply nobody collected (its caller failed) holds the lock:
        # the child may still be in that command, so it is killed rather than asked to stop.
        if self.process.is_alive() and self._lock.acquire(timeout=1.0):
            self._lock.release()
            try:
                self.call("stop", timeout_s=timeout_s)
            except EngineProcessError:
                pass  # it died or hung: the kill below is the fallback
            self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=timeout_s)


def _child_main(conn, model_path: str | None, options: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = str(options["omp_threads"])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if options["sync_cpus"]:  # this thread answers commands: it receives and stages syncs
        os.sched_setaffinity(0, options["sync_cpus"])
    child = _Child(model_path, options)
    while True:
        command, args = conn.recv()
        try:
            value = getattr(child, command)(*args)
            conn.send((True, value))
        except BaseException:  # reported to the parent, which raises it with the engine's name
            conn.send((False, traceback.format_exc(limit=6)))
        if command == "stop":
            return


class _Child:
    def __init__(self, model_path: str | None, options: dict) -> None:
        self.engine = None
        if model_path is not None:
            from rollout.engine import GenerationEngine

            self.engine = GenerationEngine(
                model_path,
                dtype=options["dtype"],
                max_model_len=256,
                max_num_seqs=16,
                kv_cache_mb=64,
                recompute_kv_on_update=options["recompute_kv_on_update"],
                tensor_parallel=options["tensor_parallel"],
            )
        self.die_after_bucket = options["die_after_bucket"]
        self.decode_cpus = options["decode_cpus"]
        self.receiver = None
        self.version = 0
        self._load_stop = threading.Event()
        self._load_thread: threading.Thread | None = None
        self.steps: list[tuple[float, int, int]] = []  # (monotonic end of step, tokens sampled, version)

    def ready(self) -> int:
        return os.getpid()

    def connect(self, plan_dict: dict, spec: LinkSpec, rank: int) -> None:
        from asyncrl.sync.receiver import WeightReceiver

        if self.receiver is not None:
            self.receiver.close()
        self.receiver = WeightReceiver.connect(plan_dict, spec, rank)
        if self.die_after_bucket is not None:
            self.receiver.transport = _DieAfter(self.receiver.transport, self.die_after_bucket)

    def sync(self, version: int, mode: str, recompute_kv: bool | None = None) -> dict:
        """Receive ``version`` and switch to it (``recompute_kv``: see ``GenerationEngine.update_weights``);
        returns ReceiveStats plus monotonic start/end stamps and ``cpu_seconds``, the CPU time of this thread
        (the one that receives and stages; its torch ops run on it, ``omp_threads`` 1) during the sync."""
        started, cpu_started = time.monotonic(), time.thread_time()
        if self.engine is not None:
            apply = self.receiver.apply_to(self.engine, recompute_kv=recompute_kv)
        else:
            apply = self._record
        pause = self.engine.paused if (self.engine is not None and mode == "pause") else None
        stats = self.receiver.sync(version, apply, pause)
        cpu_seconds = time.thread_time() - cpu_started
        return {**asdict(stats), "started": started, "ended": time.monotonic(), "cpu_seconds": cpu_seconds}

    def receive_only(self, version: int) -> float:
        """Stage every bucket of ``version`` without switching; the monotonic time the last one landed."""
        self.receiver.receive(version)
        return time.monotonic()

    def naive_receive(self, count: int) -> float:
        """The naive baseline's receiving end: ``count`` tensors, each a pickled (name, tensor) message of
        its own (a length, then the bytes) over the same group; the monotonic time the last one landed."""
        import torch

        transport, received = self.receiver.transport, []
        for index in range(count):
            length = torch.zeros(1, dtype=torch.int64)
            transport._broadcast(length, f"naive length {index}")
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
            transport._broadcast(payload, f"naive tensor {index}")
            received.append(pickle.loads(payload.numpy().tobytes()))
        self.naive_received = received
        return time.monotonic()

    def _record(self, named: list, version: int) -> None:
        self.version = version
        self.last_checksum = float(sum(tensor.double().sum().item() for _, tensor in named))

    def staged(self) -> dict:
        """The staged tensors by name (for checks in a bare receiver)."""
        return {name: tensor.clone() for name, tensor in self.receiver.staged()}

    def sample(self, prompts: list[list[int]], tag: str, max_new_tokens: int) -> list[dict]:
        return sample_sequences(self.engine, prompts, tag, max_new_tokens)

    def start_load(self, batch: int, max_new_tokens: int) -> None:
        """Keep ``batch`` requests decoding until ``stop_load``; every step is timestamped."""
        self._load_stop.clear()
        self.steps = []
        self._load_thread = threading.Thread(target=self._load, args=(batch, max_new_tokens), daemon=True)
        self._load_thread.start()

    def _load(self, batch: int, max_new_tokens: int) -> None:
        engine, issued = self.engine, 0
        if self.decode_cpus:  # on Linux, affinity set with pid 0 is this thread's alone
            os.sched_setaffinity(0, self.decode_cpus)
        while not self._load_stop.is_set():
            while engine.num_unfinished() < batch:
                engine.add_request(f"load-{issued}", [5 + issued % 50, 17, 42, 9], max_new_tokens=max_new_tokens)
                issued += 1
            version = engine.version
            before = engine.tokens_sampled
            engine.step()
            tokens = engine.tokens_sampled - before
            self.steps.append((time.monotonic(), tokens, version))

    def wait_steps(self, count: int, timeout_s: float) -> float:
        """Wait until the load has taken ``count`` steps (its first ones carry the start-up: prefill, first
        kernels); the seconds waited."""
        started = time.monotonic()
        while len(self.steps) < count:
            if self._load_thread is None or not self._load_thread.is_alive():
                raise RuntimeError("the decode load is not running")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the decode load took {len(self.steps)} of {count} steps in {timeout_s}s")
            time.sleep(0.01)
        return time.monotonic() - started

    def last_step(self) -> tuple[float, int, int] | None:
        """The load's latest step (monotonic end, tokens, version), None before its first."""
        return self.steps[-1] if self.steps else None

    def stop_load(self) -> list[tuple[float, int, int]]:
        self._load_stop.set()
        if self._load_thread is not None:
            self._load_thread.join(timeout=60)
        if self.engine is not None and self.engine.num_unfinished():
            self.engine.abort([f"load-{i}" for i in range(100_000)])
            self.engine.step()
        return self.steps

    def stop(self) -> None:
        self._load_stop.set()
        if self.receiver is not None:
            self.receiver.close()
        if self.engine is not None:
            self.engine.close()


class _DieAfter:
    """Wraps a transport; the process kills itself (SIGKILL: no clean-up, as a crash) after staging
    bucket ``bucket_index``."""

    def __init__(self, inner, bucket_index: int) -> None:
        self.inner, self.bucket_index = inner, bucket_index

    def receive(self, version: int, bucket_index: int, out):
        result = self.inner.receive(version, bucket_index, out)
        if bucket_index == self.bucket_index:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def send(self, version: int, bucket_index: int, flat) -> None:
        self.inner.send(version, bucket_index, flat)

    def close(self) -> None:
        self.inner.close()


def sample_sequences(engine, prompts: list[list[int]], tag: str, max_new_tokens: int) -> list[dict]:
    """Decode ``prompts`` (seeded by their position) to the end on ``engine``; the finished sequences as plain dicts,
    in request order (what the sync checks compare with the trainer)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i:03d}", prompt, max_new_tokens=max_new_tokens, seed=i)
    finished = []
    while engine.num_unfinished():
        finished.extend(engine.step())
    return [
        {
            "request_id": seq.request_id,
            "prompt_ids": seq.prompt_ids,
            "response_ids": seq.response_ids,
            "logprobs": seq.logprobs,
            "token_versions": seq.token_versions,
            "finish_reason": seq.finish_reason,
            "gen_seconds": seq.gen_seconds,
        }
        for seq in sorted(finished, key=lambda seq: seq.request_id)
    ]
