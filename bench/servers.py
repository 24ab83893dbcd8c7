"""The four servers, each on its own 127.0.0.1 port, each with its own directory under the workdir.

* ``upstream``     — distribution (``/usr/bin/docker-registry``), filesystem storage, access log
                     on: its ``"GET … HTTP/1.1" 200 <bytes>`` lines are how upstream bytes are
                     counted, with no relay in the data path.
* ``distribution`` — the same binary with ``proxy: remoteurl:`` (its pull-through cache), default
                     settings otherwise (info log, access log on, as shipped).
* ``regproxy``     — ``python -m proxy serve`` from this work tree (uvloop, info log).
* ``nginx``        — the ceiling for static bytes: ``sendfile on``, serving regproxy's cached blob
                     files at the same URLs (``/v2/<name>/blobs/sha256:<hex>``).

``fresh()`` stops a proxy, deletes its storage and starts it again: a cold cache and a new process
(so the peak memory is this run's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from bench.procs import Server, free_port, live_pids, wait_quiet

REPO_ROOT = Path(__file__).resolve().parents[1]
REGISTRY_BINARY = "/usr/bin/docker-registry"


def _registry_config(root: Path, port: int, remote: str | None) -> dict[str, object]:
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "regproxy-bench", "relativeurls": True},
        "health": {"storagedriver": {"enabled": False}},
    }
    if remote is not None:
        config["proxy"] = {"remoteurl": remote}
    return config


class Subject:
    """A server under measurement (or the upstream): a Server plus its storage directory."""

    def __init__(self, name: str, server: Server, port: int, storage: Path | None) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.storage = storage

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.server.pid

    def start(self) -> None:
        if self.storage is not None:
            self.storage.mkdir(parents=True, exist_ok=True)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def fresh(self) -> None:
        """Stop, wipe the cache, start: cold cache, new process.

        Then wait until every server is idle and ``sync``: the previous subject may still be
        working (distribution stores a cold blob by fetching it again in the background) and the
        page cache may hold its written bytes (distribution does not fsync); neither must run
        during, and bill its CPU and disk to, the next subject's measurement.
        """
        self.stop()
        if self.storage is not None:
            shutil.rmtree(self.storage, ignore_errors=True)
        self.start()
        wait_quiet(live_pids())
        os.sync()


def upstream(workdir: Path) -> Subject:
    d = workdir / "upstream"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = d / "config.yml"
    config.write_text(json.dumps(_registry_config(d / "data", port, None), indent=2))
    server = Server(
        "upstream",
        [REGISTRY_BINARY, "serve", str(config)],
        d / "registry.log",
        f"http://127.0.0.1:{port}/v2/",
        cwd=d,
    )
    return Subject("upstream", server, port, None)


def distribution(workdir: Path, remote: str) -> Subject:
    d = workdir / "distribution"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = d / "config.yml"
    config.write_text(json.dumps(_registry_config(d / "data", port, remote), indent=2))
    server = Server(
        "distribution",
        [REGISTRY_BINARY, "serve", str(config)],
        d / "registry.log",
        f"http://127.0.0.1:{port}/v2/",
        cwd=d,
    )
    return Subject("distribution", server, port, d / "data")


def regproxy(
    workdir: Path,
    remote: str,
    tag_ttl: str = "5m",
    command: list[str] | None = None,
    *,
    name: str = "regproxy",
    extra: list[str] | None = None,
) -> Subject:
    """``python -m proxy serve …``; ``command`` replaces ``python -m proxy`` (to A/B a patch);
    ``extra`` arguments follow the bench's own (``--config FILE``)."""
    d = workdir / "regproxy"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for key in [k for k in env if k.startswith("REGPROXY_")]:
        del env[key]  # the bench's flags are the whole configuration
    # The interpreter itself, not a shim: its PID is the server's.
    base = command or [sys.executable, "-m", "proxy"]
    argv = [
        *base,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        remote,
        "--storage",
        str(d / "data"),
        "--tag-ttl",
        tag_ttl,
        *(extra or []),
    ]
    server = Server(
        name, argv, d / f"{name}.log", f"http://127.0.0.1:{port}/v2/", cwd=REPO_ROOT, env=env
    )
    return Subject(name, server, port, d / "data")


NGINX_CONF = """\
{user}
worker_processes auto;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location = /v2/ {{ return 200 '{{}}'; }}
        location ~ "^/v2/.+/blobs/sha256:(?<p>[0-9a-f]{{2}})(?<r>[0-9a-f]{{62}})$" {{
            alias {blobs}/$p/$p$r;
        }}
    }}
}}
"""


def nginx(workdir: Path, blobs_dir: Path) -> Subject:
    """nginx serving ``blobs_dir`` (``<2 hex>/<64 hex>`` files, regproxy's layout) with sendfile."""
    d = workdir / "nginx"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = d / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the cache files
    conf.write_text(NGINX_CONF.format(user=user, dir=d, port=port, blobs=blobs_dir))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    server = Server(
        "nginx",
        [binary, "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")],
        d / "nginx.out",
        f"http://127.0.0.1:{port}/v2/",
        cwd=d,
    )
    return Subject("nginx", server, port, None)


_ACCESS = re.compile(rb'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+)')


class UpstreamMeter:
    """Counts what the upstream sent, from its access log (one line per finished response)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.log_path.stat().st_size

    def read(self, settle: float = 0.5) -> dict[str, int]:
        """Bytes and requests since :meth:`mark` (waits until the log stops growing)."""
        size = -1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = self.log_path.stat().st_size
            if now == size:
                break
            size = now
            time.sleep(settle)
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            text = f.read(max(0, size - self.offset))
        total = blob_gets = requests = 0
        for m in _ACCESS.finditer(text):
            requests += 1
            total += int(m.group(4))
            if m.group(1) == b"GET" and b"/blobs/" in m.group(2):
                blob_gets += 1
        return {"bytes": total, "requests": requests, "blob_gets": blob_gets}
