"""A local Ray (no ``run.ray_address``) listens on the loopback interface only: its GCS, raylet, agents and
workers, every TCP socket any of its processes listens on."""

from __future__ import annotations

import ipaddress

import psutil
import ray

from asyncrl.config import load_config
from asyncrl.runtime import ray_session


@ray.remote(num_cpus=0)
def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _listening_addresses(pids: set[int]) -> dict[str, list[int]]:
    """``{address: [pid, ...]}`` of the TCP sockets in LISTEN state that ``pids`` hold."""
    found: dict[str, list[int]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.setdefault(conn.laddr.ip, []).append(conn.pid)
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_a_local_ray_binds_loopback_only(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.dir={tmp_path}"])
    with ray_session(cfg):
        assert ray.get(_node_ip.remote(), timeout=60) == "127.0.0.1"  # a worker process is up too
        pids = {child.pid for child in psutil.Process().children(recursive=True)}
        addresses = _listening_addresses(pids)
    assert addresses, "found no listening socket of Ray's processes"
    assert [address for address in addresses if not _is_loopback(address)] == [], addresses
