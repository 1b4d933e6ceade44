"""Run untrusted Python (a model's answer plus its tests) in a short-lived, resource-limited child process.

The child is ``python -I -S`` (no site-packages, no user paths, no PYTHON* variables) started in a fresh temporary
folder that is removed afterwards, with an environment of PATH and HOME only, in a session of its own, under
rlimits on address space, CPU time, file size, process count and core dumps, and without network: a new network
namespace has only a down loopback, so even 127.0.0.1 is unreachable. The parent enforces the wall-clock limit by
killing the whole process group, and reads at most ``MAX_OUTPUT_BYTES`` of each stream.

Not a security boundary against a determined attacker: the child keeps the parent's user and sees its file system.
Linux only.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 64 * 1024  # per stream; the rest is read and dropped so the child never blocks on a full pipe
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_PROCESSES = 16  # ignored for root, which holds CAP_SYS_RESOURCE; the process-group kill still reaps forks
_CLONE_NEWNET = 0x40000000
_KILL_GRACE_S = 2.0  # time allowed to reap a group after SIGKILL
_READ_CHUNK = 65536
_UNSHARE_COMMANDS = (("unshare", "--net"), ("unshare", "--net", "--map-root-user"))


class SandboxError(RuntimeError):
    """The sandbox cannot be set up as asked (for example, the network cannot be isolated)."""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """Outcome of one ``run_python`` call."""

    returncode: int | None  # negative: killed by that signal; None only if the child could not be reaped
    stdout: str  # at most MAX_OUTPUT_BYTES of it, decoded as UTF-8 with replacement
    stderr: str
    timed_out: bool  # the wall-clock limit was reached and the process group was killed
    killed_reason: str | None  # why the child did not exit on its own ("wall-clock timeout", "signal SIGXCPU", ...)
    seconds: float  # wall time from start to reaping


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    network: bool = False,
) -> SandboxResult:
    """Run ``code`` as a script in a fresh, limited child process and collect what it printed.

    Raises SandboxError when ``network`` is False and the network cannot be isolated here; never runs the code
    with network access it was not given.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
    prefix: tuple[str, ...] = ()
    enter_namespace = False
    if not network:
        enter_namespace, prefix = _network_isolation()
    limits = _limits(timeout_s, memory_mb)

    def prepare_child() -> None:  # runs in the child between fork and exec
        _apply_limits(limits)
        if enter_namespace:
            _enter_new_network_namespace()

    with tempfile.TemporaryDirectory(prefix="asyncrl-sandbox-") as workdir:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as file:
            file.write(code)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir}
        start = time.monotonic()
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", "-S", script],
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=prepare_child,
            close_fds=True,
        )
        try:
            stdout, stderr, timed_out = _communicate(proc, stdin.encode(), deadline=start + timeout_s)
        finally:
            _kill_group(proc)
            returncode = _reap(proc)
        seconds = time.monotonic() - start
    return SandboxResult(
        returncode=returncode,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        killed_reason=_killed_reason(returncode, timed_out),
        seconds=seconds,
    )


# --- Linux-specific pieces ----------------------------------------------------------------------------------------


def _limits(timeout_s: float, memory_mb: int) -> dict[int, tuple[int, int]]:
    """(soft, hard) per rlimit. CPU gets a second of slack so the wall-clock kill, not SIGXCPU, usually ends a loop."""
    cpu_s = math.ceil(timeout_s) + 1
    memory_bytes = memory_mb * 1024 * 1024
    return {
        resource.RLIMIT_AS: (memory_bytes, memory_bytes),
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        resource.RLIMIT_FSIZE: (MAX_FILE_BYTES, MAX_FILE_BYTES),
        resource.RLIMIT_NPROC: (MAX_PROCESSES, MAX_PROCESSES),
        resource.RLIMIT_CORE: (0, 0),
    }


def _apply_limits(limits: dict[int, tuple[int, int]]) -> None:
    for which, (soft, hard) in limits.items():
        resource.setrlimit(which, (soft, hard))


@functools.cache
def _libc_unshare() -> Callable[[int], int]:
    """libc's unshare(2), resolved in the parent so the child only makes the call (Python < 3.12 has no os.unshare)."""
    unshare = ctypes.CDLL(None, use_errno=True).unshare
    unshare.argtypes = [ctypes.c_int]
    unshare.restype = ctypes.c_int
    return unshare


def _enter_new_network_namespace() -> None:
    """Move the calling process into a new network namespace; needs CAP_SYS_ADMIN."""
    if hasattr(os, "unshare"):
        os.unshare(os.CLONE_NEWNET)
        return
    if _libc_unshare()(_CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNET): {os.strerror(errno)}")


@functools.cache
def _network_isolation() -> tuple[bool, tuple[str, ...]]:
    """How to cut a child off the network here: (unshare in the child, command prefix). Probed once per process."""
    _libc_unshare()  # resolve before any fork
    probe = [sys.executable, "-I", "-S", "-c", "pass"]
    try:
        subprocess.run(probe, preexec_fn=_enter_new_network_namespace, check=True, timeout=30, capture_output=True)
        return True, ()
    except (subprocess.SubprocessError, OSError):
        pass
    if shutil.which("unshare"):
        for prefix in _UNSHARE_COMMANDS:
            try:
                subprocess.run([*prefix, *probe], check=True, timeout=30, capture_output=True)
                return False, prefix
            except (subprocess.SubprocessError, OSError):
                continue
    raise SandboxError(
        "cannot isolate the sandbox from the network: unshare(CLONE_NEWNET) is not permitted here and the "
        "`unshare --net` command is missing or fails; run as root / with CAP_SYS_ADMIN, or pass network=True"
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group (it leads a session of its own), including anything it forked."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:  # a SIGKILLed process that does not die is stuck in the kernel
        return None


# --- I/O ----------------------------------------------------------------------------------------------------------


def _communicate(proc: subprocess.Popen[bytes], data: bytes, *, deadline: float) -> tuple[bytes, bytes, bool]:
    """Feed stdin and drain stdout/stderr until both close and the child exits, or until the deadline.

    Returns (stdout, stderr, timed_out). Output past MAX_OUTPUT_BYTES is read and dropped.
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    captured = {out_fd: bytearray(), err_fd: bytearray()}
    pending = memoryview(data)
    with selectors.DefaultSelector() as selector:
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            selector.register(stream.fileno(), selectors.EVENT_READ)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(timeout=remaining):
                fd = key.fd
                if fd in captured:
                    chunk = os.read(fd, _READ_CHUNK)
                    if not chunk:
                        selector.unregister(fd)
                    buffer = captured[fd]
                    buffer += chunk[: max(0, MAX_OUTPUT_BYTES - len(buffer))]
                    continue
                try:
                    pending = pending[os.write(fd, pending) :]
                except BrokenPipeError:
                    pending = pending[:0]
                if not pending:
                    selector.unregister(fd)
                    proc.stdin.close()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    return bytes(captured[out_fd]), bytes(captured[err_fd]), timed_out


def _killed_reason(returncode: int | None, timed_out: bool) -> str | None:
    if timed_out:
        return "wall-clock timeout"
    if returncode is None:
        return "could not be reaped"
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return None
