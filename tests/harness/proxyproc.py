"""The proxy under test as a real subprocess.

``python -m proxy serve --listen 127.0.0.1:PORT --upstream URL --storage DIR [extra args]`` with
``REGPROXY_WORKERS=N`` (1 unless a test asks for more: the suite tests the single process, and
``tests/test_workers.py`` the worker processes),
run from the repository root with stdout+stderr appended to ``log_path``. ``start()`` returns
once ``GET /v2/`` answers 200 and fails the test with the log tail if the process exits or does
not get there within ``start_timeout``. Port, storage and arguments survive ``restart()`` and
``kill9()`` + ``start()``, so tests can check what the proxy remembers across a crash.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import pytest

from tests.harness.tools import free_port, track_process, untrack_process

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class ProxyProcess:
    """One proxy process; ``base_command`` replaces ``python -m proxy`` (for harness tests)."""

    def __init__(
        self,
        upstream_url: str,
        storage: Path,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        base_command: Sequence[str] = (sys.executable, "-m", "proxy"),
        start_timeout: float = START_TIMEOUT,
        scheme: str = "http",
        workers: int = 1,
    ) -> None:
        self.upstream_url = upstream_url
        self.storage = storage
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port = port or free_port()
        self.log_path = log_path or storage.parent / f"proxy-{self.port}.log"
        self.base_command = list(base_command)
        self.start_timeout = start_timeout
        #: ``https`` when the proxy serves TLS (readiness then skips certificate checks).
        self.scheme = scheme
        self.workers = workers
        self._log_start = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with TLS)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def argv(self) -> list[str]:
        """The full command line."""
        return [
            *self.base_command,
            "serve",
            "--listen",
            self.host,
            "--upstream",
            self.upstream_url,
            "--storage",
            str(self.storage),
            *self.extra_args,
        ]

    @property
    def pid(self) -> int | None:
        """PID of the running process, if any."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn the proxy and wait (bounded) until ``GET /v2/`` answers (200, or 401 when
        client authentication is on)."""
        if self.running:
            return
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "REGPROXY_WORKERS": str(self.workers), **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if not {"NO_PROXY", "no_proxy"} & self.env.keys():
            # loopback never through a proxy this machine may name (tests of one set their own)
            env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
        track_process(self._proc)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                untrack_process(self._proc)
                self._proc = None
                pytest.fail(
                    f"proxy exited with {code} during start-up; log tail:\n{self.logs()[-4000:]}",
                    pytrace=False,
                )
            context = ssl._create_unverified_context() if self.scheme == "https" else None
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=context) as resp:
                    if resp.status == 200 and self._all_workers_ready():
                        return
                    last = f"status {resp.status}"
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 401 and self._all_workers_ready():
                    return
                last = f"status {exc.code}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.05)
        self.stop()
        pytest.fail(
            f"proxy not ready within {self.start_timeout}s ({last}); log tail:\n"
            f"{self.logs()[-4000:]}",
            pytrace=False,
        )

    def _all_workers_ready(self) -> bool:
        """One process, or the parent of several has said that every worker serves."""
        if self.workers == 1:
            return True
        with open(self.log_path, "rb") as log:  # this run's lines only
            log.seek(self._log_start)
            return f"serving with {self.workers} workers".encode() in log.read()

    def stop(self) -> int | None:
        """SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit code (None if not running)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        untrack_process(proc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL the proxy (a crash: no cleanup, no flush)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        untrack_process(proc)
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def worker_pids(self) -> list[int]:
        """The worker processes of a ``--workers N`` proxy (its children)."""
        if self._proc is None:
            return []
        pid = self._proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                return [int(p) for p in handle.read().split()]
        except OSError:
            return []

    def restart(self) -> None:
        """Stop gracefully and start again with the same port, storage, args and env."""
        self.stop()
        self.start()

    def logs(self) -> str:
        """Everything the proxy has written to stdout/stderr (all runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ProxyProcess {self.url} upstream={self.upstream_url} pid={self.pid}>"
