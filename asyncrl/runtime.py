"""The processes a run stands on: the store server and a loopback-only Ray."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from asyncrl.config import Config

log = logging.getLogger(__name__)

# Environment every worker process gets: vLLM in-process on CPU, no thread oversubscription.
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Keep the driver's terminal readable: vLLM's CPU-build warnings (no triton, no tcmalloc, ...)
    # repeat on every start; export VLLM_LOGGING_LEVEL=WARNING to see them.
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


@contextmanager
def store_server(cfg: Config, run_dir: Path) -> Iterator[str]:
    """Yield the store URL: the external ``store.url`` (checked reachable) or an embedded server, which a
    ``ServerKeeper`` restarts if it dies (``store.appendonly``); an error the run ends with while the keeper knows
    the server is lost for good becomes that ``StoreLost``, which says why."""
    from storage import EmbeddedRedis, connect
    from storage.keeper import ServerKeeper

    sc = cfg.store
    if sc.url:
        connect(
            sc.url, sc.timeout_s, ssl_ca_certs=sc.tls_ca_certs, ssl_certfile=sc.tls_certfile, ssl_keyfile=sc.tls_keyfile
        ).close()
        yield sc.url
        return
    server = EmbeddedRedis(
        run_dir / "redis",
        server_bin=sc.server_bin,
        appendonly=sc.appendonly,
        appendfsync=sc.appendfsync,
        host=sc.bind,
        password=sc.password or None,
        # Every worker of a local run is on this machine; a cluster's other nodes need TCP.
        unix_socket=sc.unix_socket and not _cluster_address(cfg),
    )
    server.start(timeout_s=cfg.store.timeout_s)
    # A restart must be up (its AOF loaded) while the clients still retry: within store.reconnect_s.
    keeper = ServerKeeper(server, sc.max_restarts, start_timeout_s=sc.reconnect_s or sc.timeout_s).start()
    try:
        yield server.unix_url if server.socket_path else server.url
    except BaseException as err:
        if keeper.failure is not None:
            raise keeper.failure from err
        raise
    finally:
        keeper.stop()


def worker_process_env(threads: int) -> None:
    """Give this process a worker's environment (``WORKER_ENV``, ``threads`` compute threads), as a
    bench that runs engines in-process needs; call it before torch or vLLM is imported."""
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def _cluster_address(cfg: Config) -> str:
    """The Ray cluster to join (``run.ray_address`` or $RAY_ADDRESS, as under ``ray job submit``); '' runs locally."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Join the Ray cluster at ``run.ray_address`` (or $RAY_ADDRESS, as under ``ray job submit``), else
    start a local Ray bound to 127.0.0.1, no dashboard, a temp folder of its own."""
    import ray

    from asyncrl.placement import cpus_needed

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = _cluster_address(cfg)
    common = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        # A loopback cluster (head started with --node-ip-address 127.0.0.1) only matches a driver on that address.
        loopback = address.split("://")[-1].startswith(("127.", "localhost"))
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **({"_node_ip_address": "127.0.0.1"} if loopback else {}), **common)
    else:
        _keep_ray_on_loopback()
        ray.init(
            num_cpus=max(cfg.run.num_cpus, math.ceil(cpus_needed(cfg))),
            object_store_memory=cfg.run.object_store_mb << 20,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=tempfile.mkdtemp(prefix="asyncrl-ray-"),
            **common,
        )
    try:
        yield
    finally:
        ray.shutdown()


def _keep_ray_on_loopback() -> None:
    """Make a local Ray bind 127.0.0.1 only. ``ray.init`` swaps ``_node_ip_address="127.0.0.1"`` for the machine's
    address (and its GCS, raylet and workers then listen on every interface) unless multi-node clusters are off,
    which Ray reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported: too early for the
    setdefault above, hence the module attribute. A local Ray has no other node to reach it."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
