"""Server processes the benchmark starts, and the guarantee that it stops every one of them.

Every process is started in its own session (so a Ctrl-C in the terminal reaches the bench, not
the servers directly) and registered in :data:`LIVE`; :func:`stop_all` (called from ``finally``,
from ``atexit`` and from the SIGTERM/SIGHUP handlers installed by :func:`install_signal_handlers`)
terminates what is still running, SIGKILLing what lingers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

STOP_TIMEOUT = 10.0

#: Every server process still running, in start order.
LIVE: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until any HTTP answer arrives; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as exc:
            exc.close()
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} within {timeout}s ({last!r})")


class Server:
    """One server process: argv, a log file, a readiness URL."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        ready_url: str,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.ready_url = ready_url
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        LIVE.append(self.proc)
        try:
            wait_http(self.ready_url, self.start_timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.log_tail()}") from None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop(proc)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ValueError):
        LIVE.remove(proc)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(STOP_TIMEOUT)


def stop_all() -> None:
    """Stop every server still running, newest first."""
    for proc in reversed(list(LIVE)):
        _stop(proc)


def run(
    argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client command to completion (bounded); raise with its output if it fails."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} exited with {result.returncode}: {(result.stderr or result.stdout)[-2000:]}"
        )
    return result


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt so ``finally`` blocks stop the servers.

    SIGINT too: a shell starting the bench in the background leaves it ignored.
    """
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, _on_signal)


atexit.register(stop_all)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (``regproxy serve --workers N``'s workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children so far, in seconds (threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / ticks
    return own + sum(_cpu_or_none(child) or 0.0 for child in children(pid))


def tree_pss_kib(pid: int) -> int:
    """Proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``) of ``pid`` and its live
    children, in KiB: each page shared by n of them counts 1/n in each, so the sum is the memory
    the tree holds once (what its cgroup is charged). Summed RSS would count the pages the
    workers of a ``--workers N`` server share with their parent after ``fork`` N + 1 times."""
    total = 0
    for one in (pid, *children(pid)):
        try:
            with open(f"/proc/{one}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            if one == pid:
                raise KeyError("Pss") from None
    return total


#: A process is quiet when it used less than this much CPU over ``QUIET_INTERVAL``.
QUIET_CPU = 0.02
QUIET_INTERVAL = 0.25


def wait_quiet(pids: list[int], timeout: float = 30.0) -> float:
    """Wait until every process in ``pids`` is idle; return the seconds waited.

    A server may go on working after its client has the last byte: distribution's pull-through
    cache fetches a cold blob from upstream a second time in the background to store it (~3 s
    of a core for 1 GiB here); regproxy fsyncs and renames. That work belongs to its cold GB, and
    must not run during, and be billed to, the next subject's measurement.
    """
    start = time.monotonic()
    while True:
        before = {pid: _cpu_or_none(pid) for pid in pids}
        time.sleep(QUIET_INTERVAL)
        busy = [
            pid
            for pid, cpu in before.items()
            if cpu is not None and (now := _cpu_or_none(pid)) is not None and now - cpu >= QUIET_CPU
        ]
        waited = time.monotonic() - start
        if not busy or waited >= timeout:
            return waited


def _cpu_or_none(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its children (a server's workers), None once it is gone."""
    from bench.cores import tree_cpu

    tree = tree_cpu(pid)
    return sum(tree.values()) if tree else None


def live_pids() -> list[int]:
    """Every process the bench started that is still running."""
    return [proc.pid for proc in LIVE if proc.poll() is None]
