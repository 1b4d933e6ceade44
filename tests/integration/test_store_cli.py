"""`asyncrl store ls|stats|purge` against real servers: by URL, a live run folder, and the AOF data
a finished run left behind."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from asyncrl.bench.store import synthetic_trajectories
from asyncrl.cli import main
from asyncrl.config import load_config, to_yaml
from storage import EmbeddedRedis, TrajectoryStore, connect

STREAM, GROUP = "trajectories", "trainer"


def _fill(store: TrajectoryStore) -> None:
    store.ensure_group(STREAM, GROUP)
    for index in range(3):
        store.put(STREAM, synthetic_trajectories(2, 3, 4, id_prefix=f"b{index}-"))
    (entry,) = store.read(STREAM, GROUP, "t0")
    store.ack(STREAM, GROUP, [entry.id])
    store.read(STREAM, GROUP, "t0")  # one pending


def _run_folder(tmp_path: Path, run_name: str) -> Path:
    folder = tmp_path / run_name
    folder.mkdir()
    cfg = load_config("configs/tiny.yaml", [f"run.name={run_name}", "store.appendonly=true"])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder


def test_ls_stats_and_purge_by_url(store: TrajectoryStore, redis_url: str, capsys) -> None:
    _fill(store)

    assert main(["store", "ls", "--url", redis_url]) == 0
    listing = capsys.readouterr().out
    assert store.run_id in listing
    assert urlsplit(redis_url).password not in listing and ":***@" in listing  # the password is never printed

    assert main(["store", "stats", store.run_id, "--url", redis_url]) == 0
    stats = capsys.readouterr().out
    line = next(line for line in stats.splitlines() if line.startswith(STREAM))
    # stream, entries, in flight, MiB, dead, groups (consumers, pending, lag)
    assert line.split()[1:3] == ["3", "2"]
    assert f"{GROUP} (1, 1, " in line

    assert main(["store", "purge", store.run_id, "--url", redis_url]) == 0
    assert "add --yes" in capsys.readouterr().out
    assert store.run_keys()
    assert main(["store", "purge", store.run_id, "--url", redis_url, "--yes"]) == 0
    assert store.run_keys() == []


def test_stats_of_a_live_run_folder_and_of_its_aof_afterwards(tmp_path: Path, capsys) -> None:
    folder = _run_folder(tmp_path, "cli-aof")
    server = EmbeddedRedis(folder / "redis", appendonly=True).start()
    store = TrajectoryStore(connect(server.url, 5.0), "cli-aof", 5.0)
    _fill(store)
    try:
        assert main(["store", "stats", str(folder)]) == 0
        assert "the running server of" in capsys.readouterr().out
    finally:
        store.client.close()
        server.stop()

    assert main(["store", "stats", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "AOF data" in out
    assert next(line for line in out.splitlines() if line.startswith(STREAM)).split()[1:3] == ["3", "2"]


def test_a_folder_without_store_data_says_why(tmp_path: Path, capsys) -> None:
    folder = _run_folder(tmp_path, "cli-none")

    assert main(["store", "stats", str(folder)]) == 2
    assert "kept no store data" in capsys.readouterr().err
    assert main(["store", "stats", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["stats", "purge"])
def test_a_run_id_needs_a_url(action: str, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ASYNCRL_STORE_URL", raising=False)
    assert main(["store", action, "some-run"]) == 2
    assert "--url" in capsys.readouterr().err
