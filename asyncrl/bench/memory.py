"""Peak resident memory of the processes a bench ran, so users can size machines."""

from __future__ import annotations

import resource
from pathlib import Path


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def server_peak_rss_mb(url: str, timeout_s: float) -> float:
    """Peak resident memory (VmHWM) of the redis-server at ``url`` (on this machine), found by the pid it reports."""
    from storage import connect

    client = connect(url, timeout_s)
    pid = int(client.info("server")["process_id"])
    client.close()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
