"""Pools on a real Ray cluster: two nodes on this machine (a head and a second `ray start --address` on
loopback), each with its own custom resource label; the tiny job runs with its trainer pool pinned to one
label and its rollout pool to the other, and Ray's own actor table says where each actor ran."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
POOLS = """
resources:
  placement_timeout_s: 60
  pools:
    - {name: trainers, role: trainer, cpus: 1, resources: {trainer_node: 1}}
    - {name: rollouts, role: rollout, cpus: 1, resources: {rollout_node: 1}, strategy: SPREAD}
"""
# Run in a subprocess (the test process stays free of a Ray driver): wait for the nodes, or print the
# actor table as [{class, node_labels}] from the GCS (the state API needs the dashboard, which is off).
WAIT_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", logging_level="ERROR")
deadline = time.monotonic() + 60
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    assert time.monotonic() < deadline, "second node did not join within 60s"
    time.sleep(0.5)
"""
ACTORS = """
import json, sys, ray
from ray._private.state import state
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", logging_level="ERROR")
labels = {n["NodeID"]: sorted(k for k in n["Resources"] if k.endswith("_node")) for n in ray.nodes()}
print(json.dumps([
    {"class": a["ActorClassName"], "name": a["Name"], "labels": labels.get(a["Address"]["NodeID"], [])}
    for a in state.actor_table(None).values()
]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    # --block keeps the node's processes under this one, so the test stops exactly what it started.
    return subprocess.Popen(
        [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
         "--object-store-memory", str(200 << 20), "--disable-usage-stats", *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=_env(),
    )  # fmt: skip


def _stop_node(node: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=wait_s)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    # ray start --block exits before its children; sweep the rest of its session by group id.
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _python(code: str, address: str, timeout: int = 90) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def two_node_cluster(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths live under its temp folder and must stay under 108 bytes: a short one of our own.
    temp_dir = tempfile.mkdtemp(prefix="asyncrl-2n-")
    head = _start_node(
        ["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp_dir,
         "--resources", json.dumps({"trainer_node": 1})],
        tmp_path / "head.log",
    )  # fmt: skip
    nodes = [head]
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray head did not listen within 60s"
            time.sleep(0.5)
        nodes.append(
            _start_node(["--address", address, "--resources", json.dumps({"rollout_node": 1})], tmp_path / "w.log")
        )
        _python(WAIT_NODES, address)
        yield address
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_pools_pinned_by_label_run_where_their_label_is(tmp_path, two_node_cluster):
    config = tmp_path / "pinned.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text() + POOLS)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "train", str(config), "--quiet", f"run.dir={run_dir}", "run.steps=2",
         f"run.ray_address={two_node_cluster}", "run.name=pinned"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]

    actors = json.loads(_python(ACTORS, two_node_cluster).strip().splitlines()[-1])
    where = {(a["class"], tuple(a["labels"])) for a in actors if a["class"] in ("TrainerWorker", "RolloutWorker")}
    assert where == {("TrainerWorker", ("trainer_node",)), ("RolloutWorker", ("rollout_node",))}, actors


@pytest.mark.slow
def test_a_pool_needing_a_missing_resource_fails_fast_naming_it(tmp_path):
    """On a local Ray (no such label anywhere) the run stops at placement, before any engine starts."""
    config = tmp_path / "missing.yaml"
    config.write_text(
        (ROOT / "configs" / "tiny.yaml").read_text()
        + POOLS.replace("rollout_node: 1", "h100_rollout_node: 1").replace("trainer_node: 1}", "}")
    )
    tic = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "train", str(config), "--quiet", f"run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "h100_rollout_node" in proc.stderr and "rollouts" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - tic < 90


@pytest.mark.slow
def test_submit_sh_runs_the_job_on_a_cluster_started_by_cluster_sh(tmp_path):
    """launch/cluster.sh start-head --dashboard, then launch/submit.sh: a Ray job that trains the tiny job on that
    cluster (Ray's actor table there has its workers) and writes its run folder."""
    port, api_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="asyncrl-job-")
    head = subprocess.Popen(
        [str(ROOT / "launch" / "cluster.sh"), "start-head", "--port", str(port), "--loopback", "--dashboard",
         "--dashboard-port", str(api_port), "--num-cpus", "3", "--temp-dir", temp_dir,
         "--object-store-memory", str(200 << 20), "--block",
         # Free ports for the head's agents: another Ray on this machine may hold the default ones.
         *(arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                            "--runtime-env-agent-port", "--ray-client-server-port") for arg in (flag, str(_free_port())))],
        stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while socket.socket().connect_ex(("127.0.0.1", api_port)) != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's job API did not listen within 90s"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        for _ in range(12):  # the job API listens a few seconds before the head's job agent takes jobs
            proc = subprocess.run(
                [str(ROOT / "launch" / "submit.sh"), "configs/tiny.yaml", "run.steps=2", f"run.dir={run_dir}",
                 "run.name=submitted"],
                cwd=ROOT, capture_output=True, text=True, timeout=400,
                env={**_env(), "RAY_ADDRESS": f"http://127.0.0.1:{api_port}"},
            )  # fmt: skip
            if "No available agent" not in proc.stderr:
                break
            time.sleep(5)
        agent_logs = sorted(Path(temp_dir).glob("session_latest/logs/dashboard_agent*.log"))
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + "".join(
            log.read_text()[-1500:] for log in agent_logs
        )
        assert "[submit]" in proc.stdout and "succeeded" in proc.stdout + proc.stderr
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        actors = json.loads(_python(ACTORS, f"127.0.0.1:{port}").strip().splitlines()[-1])
        assert {"TrainerWorker", "RolloutWorker"} <= {a["class"] for a in actors}, actors  # it ran on this cluster
    finally:
        _stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
