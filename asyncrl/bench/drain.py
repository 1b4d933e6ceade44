"""The read-back side of `asyncrl bench rollout`: a process of its own that drains the trajectories stream.

It stands where a trainer stands in a run: in another process than the rollout worker, so its Arrow decodes and
Redis replies do not take the worker's GIL (a reader thread inside the bench process would charge them to ours).

Protocol over its stdin and stdout, a line each: the bench writes the number of sequences to wait for; the drain
reads and acknowledges trajectory entries until that many came, then answers ``SEQUENCES TOKENS``. An empty line
or end of input ends it.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import asdict

READER = "bench"


class DrainProcess:
    """The bench's handle on a drain child process (``python -m asyncrl.bench.drain``)."""

    def __init__(self, url: str, run_name: str, store_config) -> None:
        settings = json.dumps(asdict(store_config))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asyncrl.bench.drain", url, run_name, settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def expect(self, sequences: int) -> None:
        """Start draining ``sequences`` sequences (answered by ``result``)."""
        self.process.stdin.write(f"{sequences}\n")
        self.process.stdin.flush()

    def result(self, timeout_s: float) -> tuple[int, int] | None:
        """``(sequences, response tokens)`` once the drain read them all; None if not within ``timeout_s``.

        Raises if the drain process ended."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's drain process exited (status {self.process.wait(timeout=10)})")
        sequences, tokens = map(int, line.split())
        return sequences, tokens

    def close(self) -> None:
        try:
            self.process.stdin.close()  # end of input: the drain returns
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=10)


def main(url: str, run_name: str, settings: str) -> None:
    """Drain for each count read from stdin; see the module docstring."""
    import pyarrow.compute as pc

    from asyncrl.config import StoreConfig
    from asyncrl.types import Groups, Streams
    from storage import TrajectoryStore

    store = TrajectoryStore.from_config(url, run_name, StoreConfig(**json.loads(settings)))
    try:
        while line := sys.stdin.readline().strip():
            expected, sequences, tokens = int(line), 0, 0
            while sequences < expected:  # the bench gives up on a run that overran and ends this process
                entries = store.read(
                    Streams.TRAJECTORIES, Groups.TRAINER, READER, count=expected, block_ms=1000,
                    columns=["response_ids"],
                )  # fmt: skip
                for entry in entries:
                    sequences += entry.table.num_rows
                    tokens += pc.sum(pc.list_value_length(entry.table.column("response_ids"))).as_py() or 0
                store.ack(Streams.TRAJECTORIES, Groups.TRAINER, [entry.id for entry in entries])
            print(sequences, tokens, flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
