"""Start and drive real container clients against a registry mirror on loopback.

Every wrapper here runs the real binary with all of its state in a private temporary
directory, so tests never read or write the host's ``/var/lib/docker``,
``/var/lib/containers``, ``/etc/docker/daemon.json`` or ``/etc/containers/*``::

    /tmp/dk-XXXXXXXX/              Dockerd (short: unix socket paths are limited to 108 bytes)
    ├── daemon.json                our own, empty: /etc/docker/daemon.json is never read
    ├── d.sock                     dockerd API           (docker -H unix://...)
    ├── c.sock                     our containerd's GRPC (ctr --address ...)
    ├── d/  x/                     dockerd --data-root / --exec-root
    ├── cr/ cs/                    containerd root / state
    ├── cli/                       DOCKER_CONFIG of the docker CLI
    └── dockerd.log containerd.log
    /tmp/pd-XXXXXXXX/              Podman: root/ run/ tmp/, registries.conf, containers.conf,
                                   storage.conf, policy.json

Quirks these wrappers encode (found with dockerd 20.10.24, containerd/ctr 1.6.20,
podman 4.3.1, skopeo 1.9.3, distribution 2.8.2):

* dockerd 20.10 uses the *system* containerd whenever ``/run/containerd/containerd.sock``
  exists (even a stale one) and only otherwise starts one under ``<exec-root>/containerd/``.
  To be independent of the host we start our own containerd and pass ``--containerd``.
  dockerd 20.10 keeps images in its own store, not in containerd, so ``ctr`` pulls into a
  separate namespace of that containerd and the two never see each other's images.
* vfs needs nothing else. dockerd bind-mounts its data root onto itself and removes the
  mount on a clean exit; after a SIGKILL we unmount whatever is left under our directory.
* dockerd 20.10 writes ``/etc/docker/key.json`` (its identity key; no flag moves it) and
  creates ``/run/docker/plugins``; both are shared by all instances and harmless. skopeo as
  root updates ``/var/lib/containers/cache/blob-info-cache-v1.boltdb`` (no flag moves it).
* dockerd falls back to Docker Hub after *any* mirror error, and then reports the Hub error,
  not the mirror's. Offline that fails fast (DNS), but to make it deterministic, and to make
  a successful pull proof that it went through the mirror, every client here runs with
  ``HTTP(S)_PROXY`` pointing at a loopback port that refuses connections (``offline_guard``).
  Go and containers/image never proxy loopback addresses, so mirrors on 127.0.0.0/8 are
  unaffected. A Hub fallback then fails at once with "proxyconnect tcp: ... refused".
  Several mirrors are tried in order (a dead first one costs nothing noticeable).
* docker pulls of ``testimg:1`` reach the mirror as ``/v2/library/testimg/...`` (also
  ``user/x``): ``GET /v2/``, ``HEAD`` the tag, ``GET`` it again after a 404, then digests.
  Pulling the same tag for another ``--platform`` moves the tag and leaves the old image
  dangling. ``RepoDigests`` are familiar names (``testimg@sha256:...``).
* ctr 1.6 supports ``--hosts-dir``; an ``http://`` host in hosts.toml is enough, no
  ``--plain-http``. Requests carry ``?ns=docker.io``. ctr fetches in the *client* process, so
  the proxy guard applies to the ctr command, not to containerd. When every host fails, ctr
  reports the *first* host's error (the Hub error is only logged).
* podman needs no ``--tls-verify=false`` for a mirror marked ``insecure = true``; the hidden
  ``--signature-policy`` flag replaces /etc/containers/policy.json. ``podman image inspect`` in
  4.3 has no ``Variant``; we read it from the image config via skopeo's containers-storage.
  The drop-ins in /etc/containers/registries.conf.d are still read (short-name aliases only).
  podman retries refused connections (about 3 s for a dead mirror plus guarded Hub).
* skopeo runs with ``--insecure-policy`` and an empty registries.conf.
* distribution's proxy mode panics at start-up if its upstream is not reachable yet.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

__all__ = [
    "DEFAULT_TIMEOUT",
    "DOCKER_HUB",
    "DOCKER_HUB_SERVER",
    "CommandFailed",
    "CommandTimedOut",
    "Dockerd",
    "OfflineGuard",
    "Podman",
    "client_env",
    "docker_cli",
    "parse_platform",
    "registries_conf",
    "remove_tree",
    "require_tool",
    "run",
    "skopeo",
    "skopeo_copy_all",
    "skopeo_inspect",
    "skopeo_push_oci",
    "unmount_all_under",
    "write_hosts_toml",
]

DEFAULT_TIMEOUT = 300.0

try:  # the shared helper, when tests/harness/tools.py provides it
    from .tools import require_tool
except ImportError:

    def require_tool(name: str) -> str:
        """Path of executable ``name``; skip the test without it (fail when CI=true)."""
        path = shutil.which(name)
        if path is None:
            msg = f"required tool {name!r} is not installed"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        return path


# --------------------------------------------------------------------------- processes


class CommandFailed(subprocess.CalledProcessError):
    """A client command exited non-zero; ``str()`` shows its output, unlike the base class."""

    def __str__(self) -> str:
        return _describe(self.cmd, f"exited with {self.returncode}", self.stdout, self.stderr)


class CommandTimedOut(subprocess.TimeoutExpired):
    """A client command ran past its timeout and was killed with its process group."""

    def __str__(self) -> str:
        return _describe(self.cmd, f"timed out after {self.timeout}s", self.stdout, self.stderr)


def _describe(cmd: Any, what: str, out: Any, err: Any) -> str:
    def tail(s: Any) -> str:
        if isinstance(s, bytes):
            s = s.decode(errors="replace")
        return (s or "")[-4000:].rstrip()

    argv = " ".join(map(str, cmd)) if isinstance(cmd, list | tuple) else str(cmd)
    return f"{argv}\n  {what}\n--- stdout\n{tail(out)}\n--- stderr\n{tail(err)}"


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with captured text output, bounded by ``timeout``.

    The child gets its own session so that a timeout kills everything it started, not just
    the direct child (``subprocess.run`` only kills the latter and then hangs on the pipes).
    """
    args = [os.fspath(a) for a in argv]
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            out, err = proc.communicate()
            raise CommandTimedOut(args, timeout, out, err) from None
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, args, out, err)
    return result


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for child ``pid`` to exit *without reaping it*.

    While the zombie is unreaped its pid (= its process group id) cannot be reused, so a
    following ``killpg`` can only hit processes we started.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _stop_process(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, SIGKILL the process group, reap."""
    if proc is None:
        return
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        if not _exited(proc.pid, grace):
            _killpg(proc.pid)
            _exited(proc.pid, 10)
        _killpg(proc.pid)  # helpers left in the group; the zombie leader still holds the id
    proc.wait(10)


def _wait_for(
    what: str,
    predicate: Any,
    timeout: float,
    *,
    interval: float = 0.1,
    alive: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {alive.returncode}\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout}s\n{_tail(log)}")
        time.sleep(interval)


def _tail(path: Path | None, n: int = 6000) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-n:]


# --------------------------------------------------------------------------- filesystem

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base``, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(base)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mnt = line.split()[4]
            mnt = mnt.encode().decode("unicode_escape")  # \040 etc.
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def unmount_all_under(base: Path) -> None:
    """Lazily unmount every mount under ``base`` (vfs/containerd leftovers after a kill)."""
    for _ in range(5):  # bind mounts can be stacked on the same point
        mounts = _mounts_under(base)
        if not mounts:
            return
        for mnt in mounts:
            _libc.umount2(mnt.encode(), _MNT_DETACH)


def remove_tree(base: Path) -> None:
    """Unmount, then delete ``base``; vfs leaves large trees of read-only directories."""
    if not base.exists():
        return
    unmount_all_under(base)

    def onerror(func: Any, path: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)

    shutil.rmtree(base, onerror=onerror)


def _short_tmpdir(prefix: str) -> Path:
    """A fresh directory with a short path: /tmp/<prefix>XXXXXXXX."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --------------------------------------------------------------------------- environment

_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy")


class OfflineGuard:
    """A loopback port that is bound but never listens: connections to it are refused.

    As ``HTTP(S)_PROXY`` it makes any request a client sends to a non-loopback registry
    (Docker Hub fallback) fail at once instead of depending on DNS and the network.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()


_guard: OfflineGuard | None = None


def client_env(
    extra: Mapping[str, str] | None = None,
    *,
    offline_guard: bool = True,
    no_proxy: Iterable[str] = (),
) -> dict[str, str]:
    """The environment for a client: host proxy settings removed, the offline guard set."""
    global _guard
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    for k in (
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "CONTAINERD_ADDRESS",
        "CONTAINERD_NAMESPACE",
        "CONTAINERD_SNAPSHOTTER",
        "CONTAINER_HOST",
        "CONTAINER_CONNECTION",
        "REGISTRY_AUTH_FILE",
    ):
        env.pop(k, None)
    if offline_guard:
        if _guard is None:
            _guard = OfflineGuard()
        hosts = ",".join(["127.0.0.1", "localhost", "::1", *no_proxy])
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[k] = _guard.url
        env["NO_PROXY"] = env["no_proxy"] = hosts
    if extra:
        env.update(extra)
    return env


def _hostport(mirror: str) -> str:
    """``http://127.0.0.1:5000/`` -> ``127.0.0.1:5000`` (path kept: ``host:port/prefix``)."""
    s = mirror.split("://", 1)[-1]
    return s.rstrip("/")


def _as_url(mirror: str) -> str:
    return mirror if "://" in mirror else f"http://{mirror}"


def _hostname(mirror: str) -> str:
    hp = _hostport(mirror).split("/", 1)[0]
    if hp.startswith("["):
        return hp[1:].split("]", 1)[0]
    return hp.rsplit(":", 1)[0] if hp.count(":") == 1 else hp


def parse_platform(platform: str) -> tuple[str, str, str]:
    """``linux/arm64/v8`` -> ``("linux", "arm64", "v8")``; missing parts are ``""``."""
    parts = [*platform.split("/"), "", ""]
    return parts[0], parts[1], parts[2]


# The few Docker Hub knobs a mirror test needs.
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"

# strong references: an instance dropped without stop() must still be stopped at exit
_instances: set[Dockerd | Podman] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Safety net for fixtures that never reached their teardown."""
    for inst in list(_instances):
        with contextlib.suppress(Exception):
            inst.close()
    if _guard is not None:
        _guard.close()
    if _shared_dir is not None:
        remove_tree(_shared_dir)


_shared_dir: Path | None = None


def _shared() -> Path:
    """Module-wide scratch dir with an empty registries.conf and a permissive policy."""
    global _shared_dir
    if _shared_dir is None:
        _shared_dir = _short_tmpdir("rpx-")
        (_shared_dir / "registries.conf").write_text("")
        (_shared_dir / "policy.json").write_text(_POLICY)
    return _shared_dir


_POLICY = json.dumps({"default": [{"type": "insecureAcceptAnything"}]})


# --------------------------------------------------------------------------- docker


def docker_cli() -> str:
    """The docker CLI from the docker.io package, matching dockerd 20.10, else any on PATH."""
    packaged = Path("/usr/bin/docker")
    if packaged.is_file() and os.access(packaged, os.X_OK):
        return str(packaged)
    return require_tool("docker")


_CONTAINERD_TOML = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = "{sock}.debug"
  level = "{level}"

[metrics]
  address = ""
"""


class Dockerd:
    """A private dockerd (vfs, no networking) with its own containerd, for pulls.

    ``mirrors`` become ``--registry-mirror`` (in order); their host:port and
    ``insecure_registries`` become ``--insecure-registry``. Use as a context manager or call
    :meth:`start` / :meth:`stop`. ``ctr`` talks to the same containerd.
    """

    def __init__(
        self,
        mirrors: Sequence[str] = (),
        *,
        insecure_registries: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        debug: bool = True,
        offline_guard: bool = True,
        start_timeout: float = 30.0,
        ctr_namespace: str = "regproxy",
    ) -> None:
        self.mirrors = [_as_url(m) for m in mirrors]
        self.insecure_registries = list(
            dict.fromkeys(
                [*(_hostport(m).split("/")[0] for m in self.mirrors), *insecure_registries]
            )
        )
        self.extra_args = list(extra_args)
        self.debug = debug
        self.offline_guard = offline_guard
        self.start_timeout = start_timeout
        self.ctr_namespace = ctr_namespace
        self.base: Path | None = None
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._containerd: subprocess.Popen[bytes] | None = None
        self._logfiles: list[Any] = []
        self._saved_logs = ""
        self._cli = docker_cli()
        self._dockerd_bin = require_tool("dockerd")
        self._containerd_bin = require_tool("containerd")

    # paths --------------------------------------------------------------------------
    def _p(self, name: str) -> Path:
        if self.base is None:
            raise RuntimeError("Dockerd is not started")
        return self.base / name

    @property
    def sock(self) -> Path:
        return self._p("d.sock")

    @property
    def host(self) -> str:
        """The ``-H`` / ``DOCKER_HOST`` value."""
        return f"unix://{self.sock}"

    @property
    def containerd_address(self) -> Path:
        return self._p("c.sock")

    @property
    def data_root(self) -> Path:
        return self._p("d")

    @property
    def exec_root(self) -> Path:
        return self._p("x")

    @property
    def env(self) -> dict[str, str]:
        """Environment for the docker CLI and ctr (isolated config, offline guard)."""
        return client_env(
            {"DOCKER_CONFIG": str(self._p("cli"))},
            offline_guard=self.offline_guard,
            no_proxy=[_hostname(m) for m in self.mirrors],
        )

    # lifetime -----------------------------------------------------------------------
    def start(self) -> Self:
        if self.base is not None:
            return self
        self.base = _short_tmpdir("dk-")
        _instances.add(self)
        try:
            self._start_containerd()
            self._start_dockerd()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        f = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self._logfiles.append(f)
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def _start_containerd(self) -> None:
        cfg = self._p("containerd.toml")
        cfg.write_text(
            _CONTAINERD_TOML.format(
                root=self._p("cr"),
                state=self._p("cs"),
                sock=self.containerd_address,
                level="debug" if self.debug else "info",
            )
        )
        log = self._p("containerd.log")
        self._containerd = self._spawn([self._containerd_bin, "--config", str(cfg)], log)
        _wait_for(
            "containerd",
            lambda: self.ctr("version", check=False, timeout=10).returncode == 0,
            self.start_timeout,
            interval=0.2,
            alive=self._containerd,
            log=log,
        )

    def _start_dockerd(self) -> None:
        self._p("daemon.json").write_text("{}\n")
        self._p("cli").mkdir()
        # containerd namespaces match ^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$; mkdtemp names may
        # hold "_" anywhere (e.g. "dk-ab_" or "dk-_x"), so keep only the alphanumerics.
        ns = "regproxy-" + "".join(c for c in self._p("").name if c.isalnum())
        argv = [
            self._dockerd_bin,
            f"--config-file={self._p('daemon.json')}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self._p('d.pid')}",
            f"--host={self.host}",
            f"--containerd={self.containerd_address}",
            f"--containerd-namespace={ns}",
            f"--containerd-plugins-namespace={ns}-plugins",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            *(f"--registry-mirror={m}" for m in self.mirrors),
            *(f"--insecure-registry={r}" for r in self.insecure_registries),
        ]
        if self.debug:
            argv.append("--debug")
        argv += self.extra_args
        log = self._p("dockerd.log")
        self._dockerd = self._spawn(argv, log)
        _wait_for("dockerd /_ping", self._ping, self.start_timeout, alive=self._dockerd, log=log)
        _wait_for(
            "docker info",
            lambda: self.docker("info", check=False, timeout=15).returncode == 0,
            self.start_timeout,
            interval=0.5,
            alive=self._dockerd,
            log=log,
        )

    def _ping(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                data = s.recv(4096)
        except OSError:
            return False
        return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]

    def stop(self) -> None:
        """Stop dockerd, then containerd (SIGTERM, then SIGKILL), unmount, delete the dir."""
        _stop_process(self._dockerd, grace=20)
        _stop_process(self._containerd, grace=10)
        self._dockerd = self._containerd = None
        for f in self._logfiles:
            f.close()
        self._logfiles.clear()
        if self.base is not None:
            self._saved_logs = self.logs() + "\n" + self.containerd_logs()
            remove_tree(self.base)
            self.base = None
        _instances.discard(self)

    close = stop

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def logs(self) -> str:
        """dockerd's log (stdout+stderr); after stop(), what it was at the end."""
        if self.base is None:
            return self._saved_logs
        return _tail(self._p("dockerd.log"), n=10**9)

    def containerd_logs(self) -> str:
        if self.base is None:
            return ""
        return _tail(self._p("containerd.log"), n=10**9)

    @property
    def running(self) -> bool:
        return self._dockerd is not None and self._dockerd.poll() is None

    # docker CLI ---------------------------------------------------------------------
    def docker(
        self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H unix://<sock> *args``."""
        return run([self._cli, "-H", self.host, *args], env=self.env, check=check, timeout=timeout)

    def pull(
        self,
        ref: str,
        platform: str | None = None,
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        args = ["pull"]
        if platform:
            args += ["--platform", platform]
        return self.docker(*args, ref, check=check, timeout=timeout)

    def inspect(self, ref: str) -> dict[str, Any]:
        out = self.docker("image", "inspect", "--format", "{{json .}}", ref, timeout=60)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def inspect_arch(self, ref: str) -> tuple[str, str, str]:
        """``(os, architecture, variant)`` of a local image; variant ``""`` when unset."""
        d = self.inspect(ref)
        return d.get("Os", ""), d.get("Architecture", ""), d.get("Variant", "") or ""

    def image_id(self, ref: str) -> str:
        """The image ID (``sha256:`` + config digest)."""
        return str(self.inspect(ref)["Id"])

    def repo_digests(self, ref: str) -> list[str]:
        return list(self.inspect(ref).get("RepoDigests") or [])

    def image_ids(self) -> list[str]:
        out = self.docker("image", "ls", "--all", "--quiet", "--no-trunc", timeout=60).stdout
        return list(dict.fromkeys(out.split()))

    def rmi_all(self) -> None:
        """Remove every image so that the next pull downloads everything again."""
        ids = self.image_ids()
        if ids:
            self.docker("image", "rm", "--force", *ids, timeout=120)
        left = self.image_ids()
        if left:
            raise RuntimeError(f"images left after rmi_all: {left}")

    # containerd ---------------------------------------------------------------------
    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <our containerd> -n <namespace> *args``."""
        return run(
            [
                require_tool("ctr"),
                "--address",
                str(self.containerd_address),
                "--namespace",
                namespace or self.ctr_namespace,
                *args,
            ],
            env=self.env,
            check=check,
            timeout=timeout,
        )

    def ctr_pull(
        self,
        ref: str,
        hosts_dir: str | os.PathLike[str],
        platform: str | None = None,
        all_platforms: bool = False,
        *,
        namespace: str | None = None,
        snapshotter: str = "native",
        plain_http: bool = False,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir DIR`` (fully qualified ``ref``: docker.io/library/x:1).

        Unpacks into the ``native`` snapshotter (works anywhere, unlike overlayfs), which also
        checks the layers' diff_ids.
        """
        args = ["images", "pull", "--hosts-dir", os.fspath(hosts_dir), "--snapshotter", snapshotter]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if plain_http:
            args.append("--plain-http")
        return self.ctr(*args, ref, namespace=namespace, check=check, timeout=timeout)

    def ctr_images(self, namespace: str | None = None) -> list[str]:
        return self.ctr("images", "ls", "--quiet", namespace=namespace, timeout=60).stdout.split()

    def ctr_content(self, namespace: str | None = None) -> list[str]:
        """Digests in containerd's content store (as seen from ``namespace``)."""
        out = self.ctr("content", "ls", "--quiet", namespace=namespace, timeout=60).stdout
        return out.split()

    def ctr_rmi_all(self, namespace: str | None = None) -> None:
        """Remove all images and content of ``namespace`` so the next ctr pull is cold."""
        images = self.ctr_images(namespace)
        if images:
            self.ctr("images", "rm", "--sync", *images, namespace=namespace, timeout=120)
        left = self.ctr_content(namespace)
        if left:
            self.ctr("content", "rm", *left, namespace=namespace, timeout=120)


def write_hosts_toml(
    directory: str | os.PathLike[str],
    registry_host: str = DOCKER_HUB,
    mirror_url: str | Sequence[str] = "http://127.0.0.1:5000",
    override_path: bool = False,
    *,
    server: str | None = None,
    capabilities: Sequence[str] = ("pull", "resolve"),
    skip_verify: bool = False,
) -> Path:
    """Write ``<directory>/<registry_host>/hosts.toml`` routing pulls to the mirror(s).

    As containerd documents it: ``server`` is the registry itself (tried last, default
    registry-1.docker.io for docker.io), each ``[host."URL"]`` is tried first in order.
    containerd appends ``/v2`` to a host's path unless ``override_path = true`` (then the
    URL must already end in ``/v2``) and adds ``?ns=<registry_host>`` to every request.
    """
    if server is None:
        server = DOCKER_HUB_SERVER if registry_host == DOCKER_HUB else f"https://{registry_host}"
    mirrors = [mirror_url] if isinstance(mirror_url, str) else list(mirror_url)
    caps = ", ".join(json.dumps(c) for c in capabilities)
    lines = [f"server = {json.dumps(server)}", ""]
    for m in mirrors:
        lines.append(f"[host.{json.dumps(_as_url(m))}]")
        lines.append(f"  capabilities = [{caps}]")
        if override_path:
            lines.append("  override_path = true")
        if skip_verify:
            lines.append("  skip_verify = true")
        lines.append("")
    path = Path(directory) / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------- podman


def registries_conf(
    mirrors: Mapping[str, Sequence[str]], search: Sequence[str] = (DOCKER_HUB,)
) -> str:
    """A registries.conf (v2) with ``[[registry.mirror]]`` entries, all ``insecure = true``."""
    lines = [
        f"unqualified-search-registries = {json.dumps(list(search))}",
        'short-name-mode = "permissive"',
        "",
    ]
    for prefix, locations in mirrors.items():
        lines += [
            "[[registry]]",
            f"prefix = {json.dumps(prefix)}",
            f"location = {json.dumps(prefix)}",
            "",
        ]
        for loc in locations:
            lines += [
                "[[registry.mirror]]",
                f"location = {json.dumps(_hostport(loc))}",
                "insecure = true",
                "",
            ]
    return "\n".join(lines)


class Podman:
    """podman with vfs storage, root/runroot/tmp in a private dir, and generated configs.

    ``mirrors`` is a list of mirror URLs for docker.io, or a mapping
    ``{"docker.io": [...], "ghcr.io": [...]}``.
    """

    def __init__(
        self,
        mirrors: Sequence[str] | Mapping[str, Sequence[str]] = (),
        *,
        offline_guard: bool = True,
    ) -> None:
        self._bin = require_tool("podman")
        self.mirrors: dict[str, list[str]] = (
            {k: list(v) for k, v in mirrors.items()}
            if isinstance(mirrors, Mapping)
            else ({DOCKER_HUB: list(mirrors)} if mirrors else {})
        )
        self.offline_guard = offline_guard
        self.base = _short_tmpdir("pd-")
        _instances.add(self)
        b = self.base
        for d in ("root", "run", "tmp", "net"):
            (b / d).mkdir()
        (b / "registries.conf").write_text(registries_conf(self.mirrors))
        (b / "policy.json").write_text(_POLICY)
        (b / "auth.json").write_text('{"auths": {}}\n')  # not /run/containers/0/auth.json
        (b / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{b / "run"}"\ngraphroot = "{b / "root"}"\n'
        )
        (b / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{b / "tmp"}"\n'
            f'static_dir = "{b / "root" / "libpod"}"\n'
            f'volume_path = "{b / "root" / "volumes"}"\n'
            "[network]\n"
            f'network_config_dir = "{b / "net"}"\n'
        )

    @property
    def env(self) -> dict[str, str]:
        b = self.base
        hosts = [_hostname(m) for ms in self.mirrors.values() for m in ms]
        return client_env(
            {
                "CONTAINERS_REGISTRIES_CONF": str(b / "registries.conf"),
                "CONTAINERS_CONF": str(b / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(b / "storage.conf"),
                "TMPDIR": str(b / "tmp"),
                "REGISTRY_AUTH_FILE": str(b / "auth.json"),
            },
            offline_guard=self.offline_guard,
            no_proxy=hosts,
        )

    @property
    def store_spec(self) -> str:
        """The ``[driver@graphroot+runroot]`` part of a containers-storage: reference."""
        return f"[vfs@{self.base / 'root'}+{self.base / 'run'}]"

    def podman(
        self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        b = self.base
        return run(
            [
                self._bin,
                "--root",
                str(b / "root"),
                "--runroot",
                str(b / "run"),
                "--storage-driver",
                "vfs",
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
                "--tmpdir",
                str(b / "tmp"),
                *args,
            ],
            env=self.env,
            check=check,
            timeout=timeout,
        )

    def pull(
        self,
        ref: str,
        arch: str | None = None,
        variant: str | None = None,
        os: str | None = None,
        *,
        platform: str | None = None,
        tls_verify: bool | None = None,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        args = ["pull", f"--signature-policy={self.base / 'policy.json'}"]
        if platform:
            args += ["--platform", platform]
        if arch:
            args += ["--arch", arch]
        if variant:
            args += ["--variant", variant]
        if os:
            args += ["--os", os]
        if tls_verify is not None:
            args.append(f"--tls-verify={'true' if tls_verify else 'false'}")
        return self.podman(*args, ref, check=check, timeout=timeout)

    def inspect(self, ref: str) -> dict[str, Any]:
        out = self.podman("image", "inspect", ref, timeout=60).stdout
        return json.loads(out)[0]  # type: ignore[no-any-return]

    def image_id(self, ref: str) -> str:
        return str(self.inspect(ref)["Id"])

    def inspect_arch(self, ref: str) -> tuple[str, str, str]:
        """``(os, architecture, variant)``; podman 4.3 lacks Variant, so read the config."""
        d = self.inspect(ref)
        variant = d.get("Variant")
        if variant is None:
            cfg = skopeo(
                "inspect", "--config", f"containers-storage:{self.store_spec}{d['Id']}", timeout=60
            )
            variant = json.loads(cfg.stdout).get("variant", "")
        return d.get("Os", ""), d.get("Architecture", ""), variant or ""

    def image_ids(self) -> list[str]:
        out = self.podman("images", "--all", "--quiet", "--no-trunc", timeout=60).stdout
        return list(dict.fromkeys(out.split()))

    def rmi_all(self) -> None:
        self.podman("rmi", "--all", "--force", timeout=120)
        left = self.image_ids()
        if left:
            raise RuntimeError(f"images left after rmi_all: {left}")

    def cleanup(self) -> None:
        """Remove images, unmount anything left, delete the private directory."""
        if not self.base.exists():
            return
        with contextlib.suppress(Exception):
            self.podman("rmi", "--all", "--force", check=False, timeout=60)
        remove_tree(self.base)
        _instances.discard(self)

    close = cleanup

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- skopeo


def skopeo(
    *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT, offline_guard: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo --insecure-policy *args`` with an empty registries.conf."""
    shared = _shared()
    env = client_env(
        {"CONTAINERS_REGISTRIES_CONF": str(shared / "registries.conf")}, offline_guard=offline_guard
    )
    return run(
        [require_tool("skopeo"), "--insecure-policy", *args], env=env, check=check, timeout=timeout
    )


def _docker_ref(ref: str) -> str:
    return ref if "://" in ref else f"docker://{ref}"


def skopeo_copy_all(
    src_ref: str,
    dest_dir: str | os.PathLike[str],
    *,
    transport: str = "oci",
    tls_verify: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Copy every platform of ``src_ref`` (``host:port/name:tag``) into an OCI layout or dir."""
    return skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        f"--src-tls-verify={str(tls_verify).lower()}",
        _docker_ref(src_ref),
        f"{transport}:{os.fspath(dest_dir)}",
        timeout=timeout,
    )


def skopeo_push_oci(
    layout_dir: str | os.PathLike[str],
    dest_ref: str,
    *,
    layout_ref: str | None = None,
    tls_verify: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Push an OCI layout (all platforms, digests preserved) to ``host:port/name:tag``."""
    src = f"oci:{os.fspath(layout_dir)}" + (f":{layout_ref}" if layout_ref else "")
    return skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        f"--dest-tls-verify={str(tls_verify).lower()}",
        src,
        _docker_ref(dest_ref),
        timeout=timeout,
    )


def skopeo_inspect(
    ref: str,
    *,
    raw: bool = False,
    config: bool = False,
    tls_verify: bool = False,
    timeout: float = 60,
) -> Any:
    """``skopeo inspect`` of ``host:port/name:tag``; ``raw`` gives the manifest bytes as str."""
    args = ["inspect", f"--tls-verify={str(tls_verify).lower()}"]
    if raw:
        args.append("--raw")
    if config:
        args.append("--config")
    out = skopeo(*args, _docker_ref(ref), timeout=timeout).stdout
    return out if raw else json.loads(out)
