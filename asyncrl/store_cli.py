"""`asyncrl store ls|stats|purge`: look into a store and clean up after runs.

The store is found from ``--url`` (or ``$ASYNCRL_STORE_URL``), or from a run folder: the run's
external ``store.url``, its embedded server if it is still running, or (``store.appendonly``)
a temporary server started on the AOF data the run left in ``RUN_DIR/redis``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from asyncrl.config import ConfigError, load_config

URL_ENV = "ASYNCRL_STORE_URL"


@dataclass(frozen=True, slots=True)
class Target:
    client: object
    run_id: str | None
    """The run of the folder given, when a folder was given."""
    where: str


@contextmanager
def open_target(target: str | None, url: str | None, timeout_s: float = 10.0) -> Iterator[Target]:
    """Connect to the store named by ``url``/``$ASYNCRL_STORE_URL`` or by the run folder ``target``."""
    from storage import EmbeddedRedis, StoreError, connect, redact_url

    url = url or os.environ.get(URL_ENV)
    folder = Path(target) if target and (Path(target) / "config.yaml").is_file() else None
    if url:
        client = connect(url, timeout_s)
        try:
            yield Target(client, _run_name(folder), redact_url(url))
        finally:
            client.close()
        return
    if folder is None:
        what = f"{target!r} is not a run folder (no config.yaml)" if target else "no store given"
        raise ConfigError(f"{what}: give a run folder (e.g. runs/demo) or --url redis://... (or set {URL_ENV})")
    cfg = load_config(str(folder / "config.yaml"), [])
    sc = cfg.store
    if sc.url:
        client = connect(sc.url, sc.timeout_s, ssl_ca_certs=sc.tls_ca_certs, ssl_certfile=sc.tls_certfile,
                         ssl_keyfile=sc.tls_keyfile)  # fmt: skip
        try:
            yield Target(client, cfg.run.name, redact_url(sc.url))
        finally:
            client.close()
        return
    data = folder / "redis"
    live = EmbeddedRedis.running_url(data)
    if live is not None:
        client = connect(live, timeout_s)
        try:
            yield Target(client, cfg.run.name, f"the running server of {folder}")
        finally:
            client.close()
        return
    if not any((data / name).exists() for name in ("appendonly.aof", "appendonlydir")):
        raise StoreError(
            f"{folder} kept no store data: its embedded server is stopped and ran with store.appendonly=false"
        )
    with EmbeddedRedis(data, server_bin=sc.server_bin, appendonly=True) as server:
        client = connect(server.url, timeout_s)
        try:
            yield Target(client, cfg.run.name, f"the AOF data in {data}")
        finally:
            client.close()


def _run_name(folder: Path | None) -> str | None:
    return load_config(str(folder / "config.yaml"), []).run.name if folder is not None else None


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f}"


def cmd_ls(target: str | None, url: str | None) -> int:
    from storage.admin import list_runs

    with open_target(target, url) as found:
        runs = list_runs(found.client)
        print(f"store: {found.where}")
        if not runs:
            print("no runs")
            return 0
        print(f"{'run':<32} {'keys':>8} {'MiB':>10}")
        for run in runs:
            print(f"{run.run_id:<32} {run.keys:>8} {_mib(run.bytes):>10}")
    return 0


def cmd_stats(run: str, url: str | None) -> int:
    from storage import TrajectoryStore
    from storage.admin import run_stats

    with open_target(run, url) as found:
        run_id = found.run_id or run
        stats = run_stats(TrajectoryStore(found.client, run_id, 10.0))
        print(f"store: {found.where}\nrun: {run_id}: {stats.keys} keys, {stats.payloads} payloads, "
              f"{_mib(stats.payload_bytes)} MiB of payloads")  # fmt: skip
        if not stats.streams:
            print("no streams")
            return 0
        header = f"{'stream':<16} {'entries':>8} {'in flight':>9} {'MiB':>8} {'dead':>5}"
        print(header + "  groups (consumers, pending, lag)")
        for stream in stats.streams:
            groups = ", ".join(
                f"{g.name} ({g.consumers}, {g.pending}, {'n/a' if g.lag is None else g.lag})" for g in stream.groups
            )
            print(
                f"{stream.name:<16} {stream.length:>8} {stream.inflight_entries:>9} "
                f"{_mib(stream.inflight_bytes):>8} {stream.dead_letters:>5}  {groups or '-'}",
            )
    return 0


def cmd_purge(run: str, url: str | None, yes: bool) -> int:
    from storage import TrajectoryStore

    with open_target(run, url) as found:
        run_id = found.run_id or run
        store = TrajectoryStore(found.client, run_id, 10.0)
        keys = store.run_keys()
        if not yes:
            print(f"would delete {len(keys)} keys of run {run_id!r} from {found.where}; add --yes to do it")
            return 0
        print(f"deleted {store.purge()} keys of run {run_id!r} from {found.where}")
    return 0
