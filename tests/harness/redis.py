"""A real ``redis-server`` on 127.0.0.1 for the tests, and Redis Sentinel (Debian's
``redis-sentinel``) watching a primary and its replicas."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis
from redis.sentinel import Sentinel

from tests.harness.tools import (
    free_port,
    require_tool,
    stop_process,
    track_process,
    untrack_process,
)


class RedisServer:
    """``redis-server`` with no persistence in ``workdir``; ``url`` is ``redis://127.0.0.1:P/0``.

    With ``replica_of`` it starts as a replica of that server (``--replicaof``).
    """

    def __init__(self, workdir: Path, replica_of: RedisServer | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.replica_of = replica_of
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.workdir / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *(
                    ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
                    if self.replica_of is not None
                    else []
                ),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        track_process(self._proc)
        if not _answers_ping(self.port):
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def kill9(self) -> None:
        """SIGKILL the server (a crash: clients' connections are reset)."""
        if self._proc is not None:
            untrack_process(self._proc)
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _answers_ping(port: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class RedisSentinel:
    """``redis-sentinel`` watching ``primary`` as ``service`` on 127.0.0.1, quick to fail over.

    ``url`` is the ``redis+sentinel://`` URL regproxy takes; ``master_port()`` asks the sentinel
    which server is the primary now.
    """

    def __init__(
        self,
        workdir: Path,
        primary: RedisServer,
        *,
        service: str = "regproxy",
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.binary = require_tool("redis-sentinel")
        self.workdir = workdir
        self.primary = primary
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self) -> RedisSentinel:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # sentinel rewrites it: its own writable copy
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        self._log = open(self.workdir / "sentinel.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [self.binary, str(conf)], stdout=self._log, stderr=subprocess.STDOUT
        )
        track_process(self._proc)
        if not _answers_ping(self.port):
            self.stop()
            raise RuntimeError(f"redis-sentinel did not start on port {self.port}")
        return self

    def master_port(self) -> int | None:
        with redis.Redis(port=self.port, socket_timeout=1) as client:
            addr = client.sentinel_get_master_addr_by_name(self.service)
        return int(addr[1]) if addr else None

    def wait_for_master(self, port: int, timeout: float = 15) -> None:
        """Until clients are sent to ``port``: the sentinel names it the primary of a finished
        failover (redis-py's own check of the sentinel's answer) and that server takes writes."""
        manager = Sentinel([("127.0.0.1", self.port)], socket_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if manager.discover_master(self.service) == ("127.0.0.1", port):
                    with redis.Redis(port=port, socket_timeout=1) as client:
                        client.set("regproxy-test:probe", "1")
                        return
            time.sleep(0.1)
        raise TimeoutError(f"sentinel did not promote port {port} within {timeout}s")

    def wait_for_replicas(self, count: int, timeout: float = 15) -> None:
        """Until the sentinel knows ``count`` replicas of the primary that are in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with redis.Redis(port=self.port, socket_timeout=1, decode_responses=True) as client:
                replicas = client.sentinel_slaves(self.service)
            if sum(1 for r in replicas if r.get("master-link-status") == "ok") >= count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"sentinel did not see {count} replica(s) within {timeout}s")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
