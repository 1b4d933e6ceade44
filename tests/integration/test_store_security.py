"""The store behind an ACL user confined to our key prefix, and over TLS (rediss://)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
import redis

from asyncrl.bench.store import synthetic_trajectories
from storage import EmbeddedRedis, StoreError, TrajectoryStore, connect
from storage.redis_server import _free_port

STREAM, GROUP = "trajectories", "trainer"


def _full_cycle(store: TrajectoryStore) -> None:
    """Every kind of call a run makes: put, read, advance, claim, dead-letter, ack, trim, purge."""
    store.ensure_group(STREAM, "reward")
    store.ensure_group("scored", GROUP)
    for index in range(3):
        store.put(STREAM, synthetic_trajectories(2, 3, 4, id_prefix=f"b{index}-"))
    first, second, third = store.read(STREAM, "reward", "r0", count=3, columns=["response_ids"])
    assert store.advance(STREAM, "reward", first.id, "scored", pa.table({"score": [1.0, 0.0]})) is not None
    (claimed,) = store.claim_stale(STREAM, "reward", "r1", min_idle_ms=0, count=1)
    assert store.dead_letter(STREAM, "reward", third.id, "test")
    (scored,) = store.read("scored", GROUP, "t0")
    assert scored.table.column("score").to_pylist() == [1.0, 0.0]
    assert store.ack("scored", GROUP, [scored.id]) == 1
    assert store.ack(STREAM, "reward", [claimed.id]) == 1
    store.trim(STREAM)
    store.set_value("policy_version", 2)
    assert store.purge() > 0


def test_an_acl_user_confined_to_the_prefix_can_run_everything(redis_url: str) -> None:
    admin = connect(redis_url, 5.0)
    user, password = f"asyncrl-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["asyncrl:*"], commands=["+@all", "-@dangerous"]
    )
    try:
        address = urlsplit(redis_url)
        url = f"redis://{user}:{password}@{address.hostname}:{address.port}/0"
        client = connect(url, 5.0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("outside-the-prefix", 1)  # the confinement is real
        _full_cycle(TrajectoryStore(client, f"acl-{uuid.uuid4().hex[:8]}", 5.0))
        client.close()
    finally:
        admin.acl_deluser(user)
        admin.close()


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a certificate for the TLS test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return tmp_path


def test_tls_store_with_a_private_ca(certificate: Path) -> None:
    cert, key = certificate / "cert.pem", certificate / "key.pem"
    tls_port = _free_port("127.0.0.1")
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
    try:
        server = EmbeddedRedis(certificate / "redis", extra_args=tls).start()
    except StoreError as err:
        if "tls" in str(err).lower():
            pytest.skip(f"this redis-server has no TLS support: {err}")
        raise
    try:
        url = f"rediss://:{server.password}@127.0.0.1:{tls_port}/0"
        with pytest.raises(StoreError, match="certificate verify failed"):
            connect(url, 5.0)  # the private CA is not trusted by default
        client = connect(url, 5.0, ssl_ca_certs=str(cert))
        _full_cycle(TrajectoryStore(client, f"tls-{uuid.uuid4().hex[:8]}", 5.0))
        client.close()
    finally:
        server.stop()
