"""`asyncrl bench sync`: our bucketed broadcast against the copy limit and a naive per-tensor push.

The model is a seeded Qwen2 of ~150 MB fp32 and 122 tensors (hidden 512, 10 layers), built once into
the cache. This process plays the trainer (the model's state dict is the source); one vLLM engine
runs in a child process (``asyncrl.sync.local``) joined to a gloo sync group (the broadcast
transport, ``sync.bucket_mb`` buckets). Sides, each timed ``repeats`` times after a warm-up, medians:

- ``in-process copy``: every tensor copied into a preallocated destination in this process: the
  memory-bandwidth limit for moving these bytes once (the link here is memory too).
- ``ours``: ``PoolSender.send`` (cast/flatten of bucket i+1 overlapping the send of bucket i) until
  the engine has staged the last bucket. The engine's switch (the reload it pauses for) is shown
  separately: it is the same for any transport.
- ``naive``: the full state dict pushed tensor by tensor over the same group: per tensor a pickled
  (name, tensor) message (its length, then its bytes), unpickled by the engine into a fresh tensor.
- decode throughput: the engine keeps a batch decoding; tokens/s over back-to-back ``inflight`` syncs
  (receive + switch) against the same span without a sync.

The last line is ``sync ratio (ours/naive per-tensor): X``.
"""

from __future__ import annotations

import os
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import TextIO

from asyncrl.config import Config

BENCH_MODEL = "sync-bench-qwen2"
DECODE_BATCH = 8


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


def bench_sync(
    cfg: Config, *, repeats: int = 3, syncs: int = 4, bucket_mb: float | None = None, out: TextIO = sys.stdout
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
    say(f"model: {nbytes / 1e6:.1f} MB float32, {plan.num_tensors} tensors, {len(plan.buckets)} buckets of "
        f"<= {bucket_mb:g} MiB; 1 engine (child process), gloo on 127.0.0.1, {torch.get_num_threads()} torch threads here")  # fmt: skip

    engine = EngineProcess("bench", str(model_dir))
    try:
        timeout = cfg.sync.timeout_s
        spec = LinkSpec(
            pool="bench", transport="broadcast", world_size=2, timeout_s=timeout, port=host_rendezvous(timeout).port
        )
        engine.send_only("connect", plan.to_dict(), spec, 1)
        transport = build_transport(spec, SENDER_RANK)
        engine.reply("connect", timeout + 10)
        sender = PoolSender(plan, transport, timeout)

        def ours(version: int) -> float:
            engine.send_only("receive_only", version)
            started = time.monotonic()
            sender.send(tensors, version)
            return engine.reply("receive_only", timeout + 10) - started

        def naive(_: int) -> float:
            engine.send_only("naive_receive", len(tensors))
            started = time.monotonic()
            for index, (name, tensor) in enumerate(tensors.items()):
                payload = pickle.dumps((name, tensor))
                transport._broadcast(torch.tensor([len(payload)], dtype=torch.int64), f"naive length {index}")
                transport._broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), f"naive tensor {index}")
            return engine.reply("naive_receive", timeout + 10) - started

        destination = {name: torch.empty_like(tensor) for name, tensor in tensors.items()}

        def copy(_: int) -> float:
            started = time.monotonic()
            for name, tensor in tensors.items():
                destination[name].copy_(tensor)
            return time.monotonic() - started

        sides = {"in-process copy": copy, "ours (bucketed broadcast)": ours, "naive per-tensor": naive}
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for run in range(repeats + 1):  # run 0 warms up every side
            for side, measure in sides.items():
                elapsed = measure(1000 + run)
                if run:
                    seconds[side].append(elapsed)
        medians = {side: statistics.median(values) for side, values in seconds.items()}
        for side, median in medians.items():
            runs = " ".join(f"{nbytes / s / 1e9:.2f}" for s in seconds[side])
            say(f"{side:<28} {nbytes / median / 1e9:6.2f} GB/s  median {median * 1000:7.1f} ms  (runs GB/s: {runs})")

        # Decode throughput: the same span with and without back-to-back in-flight syncs (receive + switch).
        engine.call("start_load", DECODE_BATCH, 64)
        time.sleep(2.0)  # past the load's ramp-up (prefill of the first batch)
        switch, version, windows = [], 2000, []
        for _ in range(syncs):
            version += 1
            engine.send_only("sync", version, cfg.sync.mode)
            sender.send(tensors, version)
            stats = engine.reply("sync", timeout + 10)
            switch.append(stats["switch_seconds"])
            windows.append((stats["started"], stats["ended"]))
        sync_span = windows[-1][1] - windows[0][0]
        quiet_start = time.monotonic()
        time.sleep(sync_span)
        steps = engine.call("stop_load")
        quiet_end = time.monotonic()

        def rate(start: float, end: float) -> float:
            return sum(tokens for stamp, tokens, _ in steps if start < stamp <= end) / (end - start)

        during = rate(windows[0][0], windows[-1][1])
        without = rate(quiet_start, min(quiet_end, quiet_start + sync_span))
        say(
            f"engine switch (reload under its lock): median {statistics.median(switch) * 1000:.1f} ms over {syncs} syncs"
        )
        say(f"decode tokens/s: {without:.1f} without a sync, {during:.1f} during {syncs} back-to-back "
            f"{cfg.sync.mode} syncs ({sync_span:.2f} s)")  # fmt: skip
        say(f"broadcast/copy bandwidth: {medians['in-process copy'] / medians['ours (bucketed broadcast)']:.2f}")
        say(f"decode ratio (during sync/without, {cfg.sync.mode}): {during / max(without, 1e-9):.2f}")
        sender.close()
    finally:
        engine.close()
    say(f"sync ratio (ours/naive per-tensor): {medians['naive per-tensor'] / medians['ours (bucketed broadcast)']:.2f}")
