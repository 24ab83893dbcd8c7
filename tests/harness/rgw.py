"""A second real S3 implementation for the tests: Ceph's RADOS Gateway on a one-node cluster.

Everything comes from Debian's packages (bookworm: Ceph 16.2.15 "pacific"): ``ceph-mon``,
``ceph-osd`` (which bring ``ceph-base``/``ceph-common``: ``monmaptool``, the ``ceph`` CLI) and
``radosgw`` (``radosgw``, ``radosgw-admin``). ``RadosGateway(workdir).start()`` stands up::

    workdir/ceph.conf     the cluster's only configuration (no /etc/ceph, no systemd)
    workdir/mon.a/        one monitor, msgr2 on 127.0.0.1:<free port>
    workdir/osd.0/        one OSD on ``memstore`` (objects in RAM; written out at a clean stop)
    workdir/log/          one log per daemon/tool (``log_tail()`` shows them on failure)
    /tmp/rp-rgw-*/        pid files and admin sockets (short path: sun_path is 108 bytes)

and ``radosgw`` with its ``beast`` frontend on ``127.0.0.1:<free port>``; a user made with
``radosgw-admin user create`` holds the test credentials (``ACCESS_KEY_ID``/``SECRET_ACCESS_KEY``,
the same as SeaweedFS's). Bootstrap, in order:

1. ``monmaptool --create --addv a [v2:127.0.0.1:P]`` and ``ceph-mon --mkfs``; ``ceph-mon -f``;
2. ``ceph osd new <uuid>`` (waits for the monitor), ``ceph-osd --mkfs``; ``ceph-osd -f``;
3. ``radosgw -f`` (creates its pools once the OSD is up); poll until it answers HTTP;
4. ``radosgw-admin user create``; poll until a signed ``PutObject`` succeeds.

Choices that make a one-node cluster on loopback work (and quickly):

* ``auth_* = none`` (no keyrings): nothing leaves 127.0.0.1. ``radosgw`` defaults to
  ``ms_mon_client_mode = secure``, which cephx alone can give: with ``auth none`` it fails every
  monitor connection with ``send_auth_request get_initial_auth_request returned -13``, so the
  conf says ``ms mon client mode = crc``.
* ``osd pool default size = 1``, ``mon allow pool size one``, ``osd crush chooseleaf type = 0``:
  every placement group active on one OSD.
* no ``ceph-mgr``: data I/O does not need it (``ceph -s`` shows 0 pools: statistics are the
  manager's); pools get one placement group each, autoscaling off.
* ``paxos propose interval = 0.01``: radosgw creates its seven pools one monitor command at a time,
  and each waited out the default one-second proposal interval (radosgw took 11 s to answer, the
  whole start 17.6 s; now 0.5 s and ~2 s).
* ``rgw gc obj min wait/processor period = 5``: the data of deleted objects (beyond their first
  4 MiB) leaves the OSD's memory within seconds instead of two hours (measured: 200 MiB written
  took the OSD from 47 to 459 MB RSS, deleted 296 MB, 15 s later 53 MB).
* every daemon binds msgr2 on 127.0.0.1 only (``ms bind msgr1 = false``, ``public/cluster addr``).

``start()`` stands the cluster up once; afterwards ``stop()``/``kill()`` end only ``radosgw`` (the
object store's S3 face down, the data kept in the cluster) and ``start()`` brings it back on the
same port (~0.2-0.4 s). ``close()`` ends every process this harness started: radosgw, the OSD
(SIGKILL: memstore would write every object out at a clean stop), the monitor.

Start-up on this shared 2-core machine until S3 stored a first object: 1.9-2.6 s (monitor 0.2 s,
``ceph osd new`` 0.4-1.1 s, OSD 0.2 s, radosgw 0.5-0.8 s, user 0.1-0.3 s); ``startup_seconds`` and
``timings`` hold the figures of a run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Self

import botocore.exceptions

from tests.harness.s3store import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Store
from tests.harness.tools import free_port, require_tool, track_process, untrack_process

#: Debian packages (bookworm) the harness needs; ``scripts/test`` installs them.
DEBIAN_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
TOOLS = ("monmaptool", "ceph-mon", "ceph", "ceph-osd", "radosgw", "radosgw-admin")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
#: Bucket the harness writes its readiness probe to (not handed to tests).
PROBE_BUCKET = "regproxy-harness-probe"
USER = "regproxy-test"


class CephError(RuntimeError):
    """A bootstrap step failed; the message holds the command, its output and the log tails."""


class RadosGateway(S3Store):
    """A one-node Ceph cluster in ``workdir`` with radosgw on ``http://127.0.0.1:PORT``."""

    name = "rgw"

    def __init__(
        self,
        workdir: Path,
        *,
        access_key_id: str = ACCESS_KEY_ID,
        secret_access_key: str = SECRET_ACCESS_KEY,
    ) -> None:
        self.tools = {tool: require_tool(tool) for tool in TOOLS}
        self.workdir = workdir
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.port = free_port()
        self.conf_path = workdir / "ceph.conf"
        self.log_dir = workdir / "log"
        self.run_dir = Path(tempfile.mkdtemp(prefix="rp-rgw-", dir="/tmp"))
        self._mon: subprocess.Popen[bytes] | None = None
        self._osd: subprocess.Popen[bytes] | None = None
        self._rgw: subprocess.Popen[bytes] | None = None
        self._outputs: list[IO[bytes]] = []
        self._closed = False
        self._client = None
        #: Seconds the last ``start()`` took until S3 accepted a write.
        self.startup_seconds: float | None = None
        #: Seconds of each bootstrap step of the first ``start()`` (``mon``, ``osd``, ``rgw``...).
        self.timings: dict[str, float] = {}

    # -- addresses -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> dict[str, int]:
        """PID of every daemon running now, by name (``mon``, ``osd``, ``rgw``)."""
        procs = {"mon": self._mon, "osd": self._osd, "rgw": self._rgw}
        return {name: p.pid for name, p in procs.items() if p is not None and p.poll() is None}

    @property
    def running(self) -> bool:
        return self._rgw is not None and self._rgw.poll() is None

    def conf(self) -> str:
        """The cluster's ``ceph.conf``."""
        run, logs, work = self.run_dir, self.log_dir, self.workdir
        return f"""\
[global]
fsid = {self.fsid}
mon host = v2:127.0.0.1:{self.mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
ms mon client mode = crc
auth cluster required = none
auth service required = none
auth client required = none
keyring = {work}/no-keyring
run dir = {run}
admin socket = {run}/$name.$pid.asok
pid file = {run}/$name.pid
log file = {logs}/$name.log
log to stderr = false
err to stderr = true
crash dir = {work}/crash
mon data = {work}/$name
osd data = {work}/$name
osd objectstore = memstore
memstore device bytes = {4 * 1024**3}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.01
paxos min wait = 0.01
osd op num shards = 1
osd op num threads per shard = 2

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{self.port}
rgw data = {work}/rgw
rgw thread pool size = 64
rgw gc obj min wait = 5
rgw gc processor period = 5
rgw rados pool pg num min = 1
"""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Stand the cluster up (first call) and start radosgw; returns once S3 stored a probe."""
        if self.running:
            return self
        if self._closed:
            raise RuntimeError("the cluster was closed: its objects are gone with the OSD")
        t0 = time.monotonic()
        first = self._mon is None
        try:
            if first:
                self._bootstrap()
            else:
                self._rgw = self._spawn("rgw", "radosgw", "-f", "-n", "client.rgw")
                self._wait_http(t0 + START_TIMEOUT)
            self._wait_writable(t0 + START_TIMEOUT)
        except BaseException:
            if first:
                self.close()
            else:
                self.kill()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _bootstrap(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        step = time.monotonic()

        def lap(name: str) -> None:
            nonlocal step
            now = time.monotonic()
            self.timings[name] = round(now - step, 2)
            step = now

        for sub in ("mon.a", "osd.0", "rgw", "crash"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.conf())
        monmap = self.workdir / "monmap"
        self._run(
            "monmaptool",
            "--create",
            "--clobber",
            "--fsid",
            self.fsid,
            "--addv",
            "a",
            f"[v2:127.0.0.1:{self.mon_port}]",
            str(monmap),
            conf=False,
        )
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._mon = self._spawn("mon", "ceph-mon", "-f", "-i", "a")
        lap("mon")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "--connect-timeout", "60", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new gave id {osd_id!r}, expected 0")
        lap("osd new")
        self._run("ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid)
        self._osd = self._spawn("osd", "ceph-osd", "-f", "-i", "0")
        lap("osd mkfs+spawn")
        self._rgw = self._spawn("rgw", "radosgw", "-f", "-n", "client.rgw")
        self._wait_http(deadline)
        lap("rgw")
        self._run(
            "radosgw-admin",
            "user",
            "create",
            "--uid",
            USER,
            "--display-name",
            USER,
            "--access-key",
            self.access_key_id,
            "--secret-key",
            self.secret_access_key,
        )
        lap("user")

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("CEPH_", "AWS_"))}

    def _argv(self, tool: str, args: tuple[str, ...], conf: bool = True) -> list[str]:
        return [self.tools[tool], *(["-c", str(self.conf_path)] if conf else []), *args]

    def _run(self, tool: str, *args: str, conf: bool = True) -> str:
        argv = self._argv(tool, args, conf)
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=90,
                env=self._env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"timed out: {' '.join(argv)}\n{self.log_tail()}") from exc
        if proc.returncode != 0:
            raise CephError(
                f"exit {proc.returncode}: {' '.join(argv)}\n{proc.stdout}{proc.stderr}\n"
                f"{self.log_tail()}"
            )
        return proc.stdout

    def _spawn(self, name: str, tool: str, *args: str) -> subprocess.Popen[bytes]:
        output = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - closed in close()
        self._outputs.append(output)
        proc = subprocess.Popen(
            self._argv(tool, args),
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self._env(),
            start_new_session=True,
        )
        track_process(proc)
        return proc

    def _check_alive(self) -> None:
        for name, proc in (
            ("ceph-mon", self._mon),
            ("ceph-osd", self._osd),
            ("radosgw", self._rgw),
        ):
            if proc is not None and proc.poll() is not None:
                raise CephError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")

    def _wait_http(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    return
            except urllib.error.HTTPError as exc:  # any HTTP answer counts
                exc.close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"radosgw on {self.endpoint} not answering\n{self.log_tail()}")

    def _wait_writable(self, deadline: float) -> None:
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=PROBE_BUCKET)
                client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"radosgw on {self.endpoint} not writable: {last!r}\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM radosgw and wait (SIGKILL after ``STOP_TIMEOUT``); the cluster keeps the data."""
        _end(self._rgw, signal.SIGTERM)
        self._rgw = None

    def kill(self) -> None:
        """SIGKILL radosgw at once (the store dying mid-request); ``start()`` brings it back."""
        _end(self._rgw, signal.SIGKILL)
        self._rgw = None

    def close(self) -> None:
        """End every process started here (radosgw, then the OSD, then the monitor).

        The cluster cannot be started again: the OSD's objects were in its memory."""
        self._closed = True
        self._close_client()
        _end(self._rgw, signal.SIGTERM)
        self._rgw = None
        # memstore writes every object out to osd.0/ at a clean stop: pointless for a throwaway
        _end(self._osd, signal.SIGKILL)
        self._osd = None
        _end(self._mon, signal.SIGTERM)
        self._mon = None
        for output in self._outputs:
            output.close()
        self._outputs.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def log_tail(self, n: int = 1500) -> str:
        """The end of every daemon's log and output, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")[-n:]
                if text.strip():
                    parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)


def _end(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Signal *proc*, wait ``STOP_TIMEOUT``, SIGKILL if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    untrack_process(proc)
