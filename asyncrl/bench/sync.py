"""`asyncrl bench sync`: our bucketed sync against the copy limit and a naive per-tensor push.

The model is a seeded Qwen2 of ~150 MB fp32 and 122 tensors (hidden 512, 10 layers), built once into
the cache. This process plays the trainer (the model's state dict is the source); one vLLM engine
runs in a child process (``asyncrl.sync.local``), linked first by a gloo sync group (the broadcast
transport), then by the shm transport, ``sync.bucket_mb`` buckets. Sides, each timed ``repeats``
times after a warm-up, medians:

- ``in-process copy``: every tensor copied into a preallocated destination in this process, on one
  thread (each copy on our path runs on one) and on all of this process's CPUs: the memory-bandwidth
  limit for moving these bytes once (the link here is memory too).
- ``ours``: ``PoolSender.send`` (cast/flatten of bucket i+1 overlapping the send of bucket i) until
  the engine has staged the last bucket, over gloo and over shm. The engine's switch is shown
  separately: it is the same for any transport.
- ``naive``: the full state dict pushed tensor by tensor over the gloo group: per tensor a pickled
  (name, tensor) message (its length, then its bytes), unpickled by the engine into a fresh tensor.
- decode throughput: the engine keeps a batch decoding on a CPU of its own (the trainer and the
  engine's sync thread on the others); tokens/s inside each ``inflight`` shm sync's window (first
  bucket asked for to the end of the first step on the new weights) against an equally long window
  right before and after it (a step's tokens spread over the step, ``tokens_in_window``), with running requests
  keeping their KV cache and with it recomputed; the syncs start once
  the load is past its start-up (``LOAD_WARM_STEPS``), and the CPU time of the engine's sync thread is shown.

The last line is ``sync ratio (ours/naive per-tensor): X`` (ours over shm); the same-link ratio (ours
over gloo) is the line before.
"""

from __future__ import annotations

import functools
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from asyncrl.config import Config

BENCH_MODEL = "sync-bench-qwen2"
DECODE_BATCH = 8
LOAD_WARM_STEPS = 20
"""Decode steps the load takes before the first measured sync."""


def build_bench_model(root: Path) -> Path:
    """A seeded ~150 MB fp32 Qwen2 (122 tensors) with the tiny model's tokenizer; built once."""
    from asyncrl.models import build_tiny_model

    out = root / "models" / BENCH_MODEL
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tiny = build_tiny_model(root / "models" / "tiny-qwen2")
    tiny_config = AutoConfig.from_pretrained(tiny)
    config = Qwen2Config(
        vocab_size=tiny_config.vocab_size,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,  # one of the head sizes vLLM's CPU attention supports
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tiny_config.bos_token_id,
        eos_token_id=tiny_config.eos_token_id,
        pad_token_id=tiny_config.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(partial)
    partial.rename(out)
    return out


def tokens_in_window(steps: list[tuple[float, int, int]], start: float, end: float) -> float:
    """Tokens sampled in ``(start, end]``: each step's tokens spread evenly over the step, from the end of the one
    before it (the first step counts whole at its end). A window of a few steps then measures its share of the
    steps it cuts, not all or nothing of them: whole steps made a ~200 ms window of ~4 steps jump by up to 25%."""
    total, begun = 0.0, None
    for stamp, count, _ in steps:
        if begun is None or stamp <= begun:
            total += count if start < stamp <= end else 0
        else:
            overlap = min(stamp, end) - max(begun, start)
            total += count * max(0.0, overlap) / (stamp - begun)
        begun = stamp
    return total


def bench_sync(
    cfg: Config, *, repeats: int = 3, syncs: int = 8, bucket_mb: float | None = None, out: TextIO = sys.stdout
) -> None:
    import torch

    from asyncrl.sync.broadcast import host_rendezvous
    from asyncrl.sync.local import EngineProcess
    from asyncrl.sync.plan import SyncPlan, module_tensors
    from asyncrl.sync.sender import PoolSender
    from asyncrl.sync.transport import SENDER_RANK, LinkSpec, build_transport

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    bucket_mb = bucket_mb or cfg.sync.bucket_mb
    root = Path(os.environ.get("ASYNCRL_CACHE") or "~/.cache/asyncrl").expanduser()
    model_dir = build_bench_model(root)
    from transformers import AutoModelForCausalLM

    tensors = module_tensors(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    plan = SyncPlan.build(
        [(n, tuple(t.shape)) for n, t in tensors.items()], pool="bench", dtype="float32", bucket_mb=bucket_mb
    )
    nbytes = plan.nbytes
    cpus = sorted(os.sched_getaffinity(0))
    split = len(cpus) >= 2  # decode on a CPU of its own, the sync (both ends) on the others
    decode_cpus, sync_cpus = ({cpus[-1]}, set(cpus[:-1])) if split else (None, None)
    say(f"model: {nbytes / 1e6:.1f} MB float32, {plan.num_tensors} tensors, {len(plan.buckets)} buckets of "
        f"<= {bucket_mb:g} MiB; 1 engine (child process) on 127.0.0.1, {torch.get_num_threads()} torch threads here")  # fmt: skip

    # Running requests keep their KV cache unless a sync asks for the recompute (both are measured).
    engine = EngineProcess(
        "bench", str(model_dir), recompute_kv_on_update=False, decode_cpus=decode_cpus, sync_cpus=sync_cpus
    )
    try:
        timeout = cfg.sync.timeout_s
        port = host_rendezvous(timeout).port

        def connect(transport_name: str, generation: int) -> PoolSender:
            spec = LinkSpec(
                pool="bench", transport=transport_name, world_size=2, timeout_s=timeout, generation=generation,
                port=port, run_id=f"bench-{os.getpid()}",
            )  # fmt: skip
            engine.send_only("connect", plan.to_dict(), spec, 1)
            transport = build_transport(spec, SENDER_RANK)
            engine.reply("connect", timeout + 10)
            return PoolSender(plan, transport, timeout)

        def ours(sender: PoolSender) -> Callable[[int], float]:
            def measure(version: int) -> float:
                engine.send_only("receive_only", version)
                started = time.monotonic()
                sender.send(tensors, version)
                return engine.reply("receive_only", timeout + 10) - started

            return measure

        def naive(_: int) -> float:
            engine.send_only("naive_receive", len(tensors))
            started = time.monotonic()
            for index, (name, tensor) in enumerate(tensors.items()):
                payload = pickle.dumps((name, tensor))
                gloo._broadcast(torch.tensor([len(payload)], dtype=torch.int64), f"naive length {index}")
                gloo._broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), f"naive tensor {index}")
            return engine.reply("naive_receive", timeout + 10) - started

        destination = {name: torch.empty_like(tensor) for name, tensor in tensors.items()}

        def copy_with(threads: int) -> Callable[[int], float]:
            def copy(_: int) -> float:
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                started = time.monotonic()
                for name, tensor in tensors.items():
                    destination[name].copy_(tensor)
                elapsed = time.monotonic() - started
                torch.set_num_threads(previous)
                return elapsed

            return copy

        copy = copy_with(1)  # each copy on our path (pack, the memcpy into the engine) runs on one thread
        copy_all = copy_with(max(1, len(cpus)))

        seconds: dict[str, list[float]] = {}

        def measure_sides(sides: dict[str, Callable[[int], float]]) -> None:
            for run in range(repeats + 1):  # run 0 warms up every side
                for side, measure in sides.items():
                    elapsed = measure(1000 + run)
                    if run:
                        seconds.setdefault(side, []).append(elapsed)

        GLOO, SHM, NAIVE = "ours (bucketed broadcast)", "ours (shm)", "naive per-tensor"
        COPY, COPY_ALL = "in-process copy", f"in-process copy, {max(1, len(cpus))} thr"
        gloo_sender = connect("broadcast", 0)
        gloo = gloo_sender.transport
        measure_sides({COPY: copy, COPY_ALL: copy_all, GLOO: ours(gloo_sender), NAIVE: naive})
        gloo_sender.close()
        sender = connect("shm", 1)
        measure_sides({COPY: copy, COPY_ALL: copy_all, SHM: ours(sender)})
        medians = {side: statistics.median(values) for side, values in seconds.items()}
        for side in (COPY, COPY_ALL, GLOO, SHM, NAIVE):
            runs = " ".join(f"{nbytes / s / 1e9:.2f}" for s in seconds[side])
            median = medians[side]
            say(f"{side:<28} {nbytes / median / 1e9:6.2f} GB/s  median {median * 1000:7.1f} ms  (runs GB/s: {runs})")

        # Decode throughput over shm syncs, the trainer's side here confined to the sync CPUs with one torch
        # thread. Each sync's window (first bucket asked for to the end of the first step on the new weights,
        # which carries the re-prefill when the KV cache is recomputed) is compared with quiet windows of the same
        # length right before and right after it, and syncs keeping and recomputing the KV cache alternate, so a
        # change in the machine's load (other jobs) hits both sides alike.
        if split:
            os.sched_setaffinity(0, sync_cpus)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            engine.send_only("sync", 1999, cfg.sync.mode)  # warm-up: builds the engine's staging map once
            sender.send(tensors, 1999)
            engine.reply("sync", timeout + 10)
            engine.call("start_load", DECODE_BATCH, 64)
            # Past the load's start-up: its first step (prefill, first kernels) took 4-10 s on a loaded 2-core
            # machine, and a sync window holding it measured that, not the sync (0.1 instead of ~0.9).
            engine.call("wait_steps", LOAD_WARM_STEPS, timeout, timeout_s=timeout + 10)
            warm_end = engine.call("last_step")[0]
            windows: dict[bool, list[dict]] = {False: [], True: []}
            version = 2000
            for _ in range(syncs):
                for recompute in (False, True):
                    version += 1
                    engine.send_only("sync", version, cfg.sync.mode, recompute)
                    sender.send(tensors, version)
                    stats = engine.reply("sync", timeout + 10)
                    windows[recompute].append({**stats, "version": version})
                    deadline = time.monotonic() + timeout
                    while (last := engine.call("last_step")) is None or last[2] != version:  # the first new step
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"the engine took no step on version {version} in {timeout}s")
                        time.sleep(0.01)
                    # A quiet window as long as the sync's after it, and one before the next sync.
                    time.sleep(2 * (last[0] - stats["started"]) + 0.2)
            steps = engine.call("stop_load")
        finally:
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, cpus)

        tokens = functools.partial(tokens_in_window, steps)

        firsts = {v: stamp for stamp, _, v in reversed(steps)}  # version -> end of its first step
        ends = sorted([warm_end] + [firsts[w["version"]] for stats in windows.values() for w in stats])
        during, without, each = {}, {}, {}
        for recompute, stats in windows.items():
            sync_tokens = quiet_tokens = span = quiet_span = 0.0
            each[recompute] = []
            for window in stats:
                start, end = window["started"], firsts[window["version"]]
                length = end - start
                # Before: not reaching back into the previous sync (or the load's start-up).
                before_start = max(start - 0.05 - length, max(e for e in ends if e < start) + 0.05)
                in_sync = tokens(start, end)
                quiet = tokens(before_start, start - 0.05) + tokens(end + 0.05, end + 0.05 + length)
                quiet_length = max(0.0, start - 0.05 - before_start) + length
                sync_tokens, quiet_tokens = sync_tokens + in_sync, quiet_tokens + quiet
                span, quiet_span = span + length, quiet_span + quiet_length
                each[recompute].append(f"{in_sync / length / max(quiet / quiet_length, 1e-9):.2f}")
            during[recompute], without[recompute] = sync_tokens / span, quiet_tokens / quiet_span
        kept = windows[False]
        say(f"engine switch: staging beside the live model median "
            f"{statistics.median(w['switch_seconds'] - w['locked_seconds'] for w in kept) * 1000:.1f} ms, "
            f"under the engine lock median {statistics.median(w['locked_seconds'] for w in kept) * 1000:.1f} ms "
            f"over {syncs} syncs")  # fmt: skip
        for recompute, what in ((False, "KV cache kept"), (True, "KV cache recomputed")):
            say(f"engine CPU per sync ({what}): the sync thread (receive, staging, switch) median "
                f"{statistics.median(w['cpu_seconds'] for w in windows[recompute]) * 1000:.1f} ms; "
                f"windows median {statistics.median(w['ended'] - w['started'] for w in windows[recompute]) * 1000:.0f} ms "
                f"to the switch; decode ratio per sync {' '.join(each[recompute])}")  # fmt: skip
        pinned = f"decode on CPU {cpus[-1]}, both ends' sync on CPU(s) {cpus[:-1]}" if split else "one CPU, shared"
        for recompute, what in ((False, "running requests keep their KV cache"), (True, "KV cache recomputed")):
            say(f"decode tokens/s ({pinned}; {what}): {during[recompute]:.1f} during {syncs} {cfg.sync.mode} shm "
                f"syncs, {without[recompute]:.1f} in as long right before and after each")  # fmt: skip
        say(
            f"broadcast/copy bandwidth: gloo {medians[COPY] / medians[GLOO]:.2f}, shm {medians[COPY] / medians[SHM]:.2f}"
        )
        say(f"decode ratio (during sync/without, {cfg.sync.mode}): {during[False] / max(without[False], 1e-9):.2f} "
            "(running requests keep their KV cache)")  # fmt: skip
        say(f"decode ratio (during sync/without, {cfg.sync.mode}, KV cache recomputed after the switch): "
            f"{during[True] / max(without[True], 1e-9):.2f}")  # fmt: skip
        say(f"same-link ratio (ours over gloo/naive per-tensor over gloo): {medians[NAIVE] / medians[GLOO]:.2f}")
        sender.close()
    finally:
        engine.close()
    say(f"sync ratio (ours/naive per-tensor): {medians[NAIVE] / medians[SHM]:.2f}")
