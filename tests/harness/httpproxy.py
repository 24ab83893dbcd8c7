"""A real forward proxy, Debian's ``tinyproxy``, on 127.0.0.1: the corporate proxy between a
regproxy and the internet.

Plain-HTTP requests reach it in absolute form (``GET http://host/path``) and it adds a ``Via``
header on the way on; HTTPS goes through a ``CONNECT`` tunnel. Its log, at level ``Connect``,
names every request and tunnel (:meth:`HttpProxy.requests`).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from tests.harness.tools import free_port, require_tool, stop_process, track_process

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+ \S+)")


class HttpProxy:
    """``tinyproxy`` in the foreground with its config and log in ``workdir``; ``url`` is
    ``http://127.0.0.1:P``. Credentials (``user``, ``password``) make it ask for Basic auth."""

    def __init__(self, workdir: Path, *, user: str | None = None, password: str = "") -> None:
        self.binary = require_tool("tinyproxy")
        self.workdir = workdir
        self.port = free_port()
        self.user, self.password = user, password
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tinyproxy.log"

    def start(self) -> HttpProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            "MaxClients 100",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            f'PidFile "{self.workdir / "tinyproxy.pid"}"',
            "Allow 127.0.0.1",
            # no ConnectPort line: CONNECT to any port (the test upstreams' are random)
        ]
        if self.user:
            lines.append(f"BasicAuth {self.user} {self.password}")
        config = self.workdir / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [self.binary, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        track_process(self._proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tinyproxy did not start on port {self.port}")

    def requests(self) -> list[str]:
        """Every request it was asked to forward, as ``METHOD target`` (``GET http://…``,
        ``CONNECT host:port``), in order."""
        if not self.log_path.exists():
            return []
        return _REQUEST.findall(self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
