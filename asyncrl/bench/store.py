"""`asyncrl bench store`: the transfer store against the Redis ceiling, a Ray queue and a memory copy.

The same trajectories (default 10,000 of 512 prompt + 512 response tokens with log-probs and
per-token versions) go through each side in messages of ``rows`` trajectories, first all put,
then all read back and acknowledged, in batches of ``read_batch`` messages:

- ``ours``: ``TrajectoryStore.put`` (Arrow encode, payload + stream entry, in-flight accounting)
  then ``read`` through a consumer group (decode to an Arrow table) and ``ack`` (payload freed).
- ``raw redis``: SET of the message's Arrow IPC bytes, then GET and DEL of each, pipelined per
  read batch, through the same client (stock redis-py, which packs each value into one buffer
  with its command before sending it): the Redis ceiling the issue names.
- ``raw redis, zero-copy SET``: the same, with each SET framed by ``storage.wire`` as the store
  frames its segments, so the value goes to the socket uncopied: what these bytes cost Redis
  with the store's own send path and none of its bookkeeping.
- ``ray queue``: a Ray actor holding a queue; ``put.remote(table)`` per message, then
  ``get.remote(n)``, as verl's message queue moves samples. Timed after the others, with Ray up
  (Ray's own processes would otherwise slow every side on a small machine).
- ``memory copy``: each message's bytes copied into a buffer and back out of it, in this
  process: the physical limit of moving them twice.

Throughput counts the bytes of the Arrow IPC messages (the same for every side) over the time
of both phases. Sides run alternately ``repeats`` times after a warm-up; medians are printed.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa

from asyncrl.bench.memory import own_peak_rss_mb, server_peak_rss_mb
from asyncrl.config import Config
from asyncrl.types import TRAJECTORY_SCHEMA
from storage import redact_url
from storage.codec import Segment
from storage.wire import set_then

STREAM, GROUP, CONSUMER = "bench", "bench", "bench-0"


@dataclass(frozen=True, slots=True)
class Workload:
    messages: list[pa.Table]
    blobs: list[pa.Buffer]
    """Each message as one Arrow IPC stream: the bytes every side moves."""

    @property
    def trajectories(self) -> int:
        return sum(message.num_rows for message in self.messages)

    @property
    def bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)


def synthetic_trajectories(
    count: int, prompt_tokens: int, response_tokens: int, seed: int = 0, id_prefix: str = "s"
) -> pa.Table:
    """``count`` trajectory rows of ``TRAJECTORY_SCHEMA`` with random tokens and log-probs; sample
    ids are ``<id_prefix><index>``."""
    rng = np.random.default_rng(seed)

    def lists(length: int, dtype: pa.DataType, values: np.ndarray) -> pa.Array:
        offsets = pa.array(np.arange(0, (count + 1) * length, length, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=dtype))

    def tokens(length: int) -> pa.Array:
        return lists(length, pa.int32(), rng.integers(0, 50_000, count * length, dtype=np.int32))

    names = [f"{id_prefix}{i}" for i in range(count)]
    columns = {
        "sample_id": pa.array(names),
        "prompt_id": pa.array([f"p{i // 8}" for i in range(count)]),
        "group_id": pa.array([f"g{i // 8}" for i in range(count)]),
        "prompt_ids": tokens(prompt_tokens),
        "response_ids": tokens(response_tokens),
        "behavior_logprobs": lists(
            response_tokens, pa.float32(), -rng.exponential(1.0, count * response_tokens).astype(np.float32)
        ),
        "token_versions": lists(response_tokens, pa.int32(), np.full(count * response_tokens, 7, dtype=np.int32)),
        "version_start": pa.array(np.full(count, 7, dtype=np.int32)),
        "version_end": pa.array(np.full(count, 7, dtype=np.int32)),
        "reward": pa.array(rng.random(count, dtype=np.float32)),
        "reward_failed": pa.array(np.zeros(count, dtype=bool)),
        "finish_reason": pa.array(["length"] * count),
        "worker_id": pa.array(["w0"] * count),
        "gen_seconds": pa.array(np.ones(count, dtype=np.float32)),
    }
    arrays = [
        columns[field.name] if field.name in columns else pa.nulls(count, field.type) for field in TRAJECTORY_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=TRAJECTORY_SCHEMA)


def build_workload(count: int, rows: int, prompt_tokens: int, response_tokens: int) -> Workload:
    table = synthetic_trajectories(count, prompt_tokens, response_tokens)
    messages = [table.slice(start, rows).combine_chunks() for start in range(0, count, rows)]
    blobs = []
    for message in messages:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, message.schema) as writer:
            writer.write_table(message)
        blobs.append(sink.getvalue())
    return Workload(messages, blobs)


def _batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


class OurStore:
    name = "ours (TrajectoryStore)"

    def __init__(self, url: str, cfg: Config) -> None:
        from storage import TrajectoryStore, connect

        self.client = connect(url, cfg.store.timeout_s)
        self.store = TrajectoryStore(self.client, f"bench-{uuid.uuid4().hex[:8]}", cfg.store.timeout_s)

    def run(self, work: Workload, read_batch: int) -> None:
        store = self.store
        store.ensure_group(STREAM, GROUP)
        for message in work.messages:
            store.put(STREAM, message, {"rows": message.num_rows})
        received = 0
        while received < len(work.messages):
            entries = store.read(STREAM, GROUP, CONSUMER, count=read_batch, block_ms=1000)
            if not entries:
                raise RuntimeError(f"store bench: {len(work.messages) - received} messages never arrived")
            received += len(entries)
            store.ack(STREAM, GROUP, [entry.id for entry in entries])
        store.purge()

    def close(self) -> None:
        self.store.purge()
        self.client.close()


class RawRedis:
    name = "raw redis SET/GET"

    def __init__(self, url: str, cfg: Config) -> None:
        from storage import connect

        self.client = connect(url, cfg.store.timeout_s)
        self.prefix = f"asyncrl:{{bench-raw-{uuid.uuid4().hex[:8]}}}:"

    def set(self, key: str, blob: pa.Buffer) -> None:
        self.client.set(key, memoryview(blob))

    def run(self, work: Workload, read_batch: int) -> None:
        keys = [f"{self.prefix}{index}" for index in range(len(work.blobs))]
        for key, blob in zip(keys, work.blobs, strict=True):
            self.set(key, blob)
        for batch in _batches(len(keys), read_batch):
            pipe = self.client.pipeline(transaction=False)
            for index in batch:
                pipe.get(keys[index])
            values = pipe.execute()
            if any(value is None for value in values):
                raise RuntimeError("raw redis bench: a key vanished")
            self.client.delete(*(keys[index] for index in batch))

    def close(self) -> None:
        self.client.close()


class RawRedisZeroCopy(RawRedis):
    name = "raw redis, zero-copy SET"

    def set(self, key: str, blob: pa.Buffer) -> None:
        # The store's own send path (storage.wire): the value goes to the socket as it is, where
        # the stock client first packs it into one buffer with the command.
        set_then(self.client, key, Segment([memoryview(blob)], blob.size))


class RayQueue:
    name = "ray object-store queue"

    def __init__(self, url: str, cfg: Config) -> None:
        import ray

        @ray.remote(num_cpus=0)
        class _Queue:
            def __init__(self) -> None:
                self.items: list = []

            def put(self, item) -> int:
                self.items.append(item)
                return len(self.items)

            def get(self, count: int) -> list:
                taken, self.items = self.items[:count], self.items[count:]
                return taken

        self.ray = ray
        self.queue = _Queue.remote()
        ray.get(self.queue.put.remote(None))  # started and reachable before the clock runs
        ray.get(self.queue.get.remote(1))

    def run(self, work: Workload, read_batch: int) -> None:
        ray = self.ray
        for message in work.messages:
            ray.get(self.queue.put.remote(message))
        received = 0
        for batch in _batches(len(work.messages), read_batch):
            received += len(ray.get(self.queue.get.remote(len(batch))))
        if received != len(work.messages):
            raise RuntimeError(f"ray queue bench: got {received} of {len(work.messages)} messages")

    def close(self) -> None:
        self.ray.kill(self.queue)


class MemoryCopy:
    name = "in-process copy"

    def __init__(self, url: str, cfg: Config) -> None:
        self._held: list[bytearray] = []
        self._out: list[bytearray] = []

    def run(self, work: Workload, read_batch: int) -> None:
        if not self._held:  # buffers allocated once (in the warm-up): this side measures copying only
            self._held = [bytearray(blob.size) for blob in work.blobs]
            self._out = [bytearray(blob.size) for blob in work.blobs]
        for blob, held in zip(work.blobs, self._held, strict=True):
            held[:] = memoryview(blob)
        for held, out in zip(self._held, self._out, strict=True):
            out[:] = held

    def close(self) -> None:
        self._held, self._out = [], []


# Ray's own processes (GCS, raylet) keep a share of a small machine busy while Ray is up, so the
# sides that do not need Ray run before it starts, and the Ray queue runs on its own afterwards.
SIDES: tuple[Callable, ...] = (OurStore, RawRedis, RawRedisZeroCopy, MemoryCopy)


def _time_sides(sides: list, work: Workload, read_batch: int, repeats: int, seconds: dict[str, list[float]]) -> None:
    """Warm each side up once, then run them alternately ``repeats`` times, recording seconds."""
    try:
        for side in sides:  # warm-up: connections, script loading, first allocations
            side.run(work, read_batch)
        for _ in range(repeats):
            for side in sides:
                tic = time.perf_counter()
                side.run(work, read_batch)
                seconds.setdefault(side.name, []).append(time.perf_counter() - tic)
    finally:
        for side in sides:
            side.close()


def bench_store(
    cfg: Config,
    *,
    trajectories: int = 10_000,
    prompt_tokens: int = 512,
    response_tokens: int = 512,
    rows: int = 256,
    read_batch: int = 8,
    repeats: int = 3,
    out: TextIO = sys.stdout,
) -> float:
    """Time every side ``repeats`` times on the same messages; print a table; return (and print
    last) the ratio of our median throughput to raw Redis's."""
    from asyncrl.runtime import ray_session, store_server

    work = build_workload(trajectories, rows, prompt_tokens, response_tokens)
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="asyncrl-bench-") as tmp, store_server(cfg, Path(tmp)) as url:
        _time_sides([side(url, cfg) for side in SIDES], work, read_batch, repeats, seconds)
        redis_peak = None if cfg.store.url else server_peak_rss_mb(url, cfg.store.timeout_s)
        where = redact_url(url)
        with ray_session(cfg):
            _time_sides([RayQueue(url, cfg)], work, read_batch, repeats, seconds)

    median = {name: statistics.median(times) for name, times in seconds.items()}
    gbps = {name: work.bytes / value / 1e9 for name, value in median.items()}
    ours, raw = OurStore.name, RawRedis.name
    print(
        f"asyncrl bench store: {work.trajectories} trajectories of {prompt_tokens} prompt + {response_tokens} "
        f"response tokens (ids, log-probs, versions) in {len(work.messages)} messages of {rows} rows, "
        f"{work.bytes / 1e6:.1f} MB of Arrow IPC; put all, then read+ack {read_batch} messages at a time; "
        f"median of {repeats}\nstore: {where} (store.unix_socket={cfg.store.unix_socket})\n",
        file=out,
    )
    print(f"{'side':<26} {'GB/s':>7} {'traj/s':>10} {'seconds':>8} {'vs raw redis':>13}", file=out)
    for name, value in median.items():
        print(
            f"{name:<26} {gbps[name]:>7.3f} {work.trajectories / value:>10.0f} {value:>8.3f} "
            f"{gbps[name] / gbps[raw]:>13.2f}",
            file=out,
        )
    redis_text = "n/a (external store.url)" if redis_peak is None else f"{redis_peak:.0f} MB"
    print(f"\npeak RSS: this process {own_peak_rss_mb():.0f} MB, redis-server {redis_text}", file=out)
    print(f"ours / ray queue: {gbps[ours] / gbps[RayQueue.name]:.2f}", file=out)
    print(f"ours / raw redis with zero-copy SET: {gbps[ours] / gbps[RawRedisZeroCopy.name]:.2f}", file=out)
    print(f"ours / in-process copy: {gbps[ours] / gbps[MemoryCopy.name]:.3f}", file=out)
    ratio = gbps[ours] / gbps[raw]
    print(f"store ratio (ours/raw Redis): {ratio:.2f}", file=out)
    return ratio
