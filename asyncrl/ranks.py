"""Data-parallel trainer ranks (a trainer pool with ``count`` > 1), as the driver sees them.

Each rank is a ``TrainerWorker`` of its own: it reads whole groups from the one ``trainer`` consumer group
(its own consumer name), trains ``cfg.samples_per_rank`` samples per optimizer step, and DeepSpeed averages
the ranks' gradients at the step boundary, so a step trains the same global batch as one rank would. Rank 0
sends the weights (ZeRO 1/2 keep every rank's parameters whole) and writes the shared checkpoint files.
"""

from __future__ import annotations

from typing import Any

SUMMED = ("samples", "filtered_groups", "tokens")
"""Step-result keys that add up over the ranks; lists concatenate, everything else is averaged."""


def rendezvous_address(slot: Any, timeout_s: float) -> str:
    """``host:port`` for the ranks' process group: a free port on the node of the trainer pool's first bundle,
    where rank 0 will run (found by a zero-CPU task pinned to that bundle)."""
    import ray

    strategy = slot.actor_options()["scheduling_strategy"]  # pinned to the bundle; it takes none of its resources

    @ray.remote(num_cpus=0)
    def _free_address() -> str:
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            return f"{ray.util.get_node_ip_address()}:{sock.getsockname()[1]}"

    return ray.get(_free_address.options(scheduling_strategy=strategy).remote(), timeout=timeout_s)


def merge_step_results(results: list[dict]) -> dict:
    """One optimizer step's result from every rank's ``train_step`` result: ledgers and staleness values
    concatenated, counts summed, timings and loss statistics averaged."""
    if len(results) == 1:
        return results[0]
    merged: dict[str, Any] = {}
    for key, first in results[0].items():
        values = [result[key] for result in results]
        if isinstance(first, list):
            merged[key] = [item for value in values for item in value]
        elif key in SUMMED:
            merged[key] = sum(values)
        elif isinstance(first, int | float) and not isinstance(first, bool):
            merged[key] = sum(values) / len(values)
        else:
            merged[key] = first
    return merged
