"""Cold-path figures of issue #13: several cold blobs at once, and a TLS upstream.

* ``cold_many`` — ``many_count`` different cold blobs (``many_blob`` each) fetched at once, one
  ``curl`` each, through a fresh proxy: aggregate MB/s (all bytes / wall time until the last one
  ends) and the server's CPU seconds per GB.
* ``cold_tls`` — the same upstream content behind TLS: a second ``docker-registry`` on the same
  storage directory with a certificate from a throwaway CA (``trustme``), and a second
  distribution and regproxy pointed at it, both trusting the CA through ``SSL_CERT_FILE``. One
  client on the huge blob (MB/s, CPU s/GB), then ``many_count`` blobs at once.

Kept apart from ``bench/run.py`` (one line each hooks them in) so that scenarios added there in
parallel merge cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import load, seed, servers
from bench.cores import tree_cpu_seconds
from bench.procs import LIVE, Server, free_port, wait_quiet
from bench.report import Figure, Target

if TYPE_CHECKING:
    from bench.run import Bench

MB = 1000 * 1000


@dataclass
class ManyResult:
    seconds: float
    bytes: int
    cpu_s: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / (self.bytes / 1e9)


def stream_many(
    urls: list[str], pid: int, expected: int, timeout: float, env: dict[str, str] | None = None
) -> ManyResult:
    """GET every URL at once with one curl each; wall time until the last ends, server CPU."""
    cpu0 = tree_cpu_seconds(pid)
    t0 = time.perf_counter()
    procs = []
    try:
        for url in urls:
            argv = [shutil.which("curl") or "curl", "-sS", "--fail", "-o", "/dev/null"]
            argv += ["-w", "%{size_download}", "--max-time", str(int(timeout)), url]
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            LIVE.append(proc)
            procs.append(proc)
        total = 0
        for proc in procs:
            out, err = proc.communicate(timeout=timeout + 10)
            got = int(out.strip() or 0)
            if proc.returncode != 0 or got != expected:
                raise RuntimeError(f"streamed {got} bytes of {expected}: {err.decode()[-300:]}")
            total += got
        seconds = time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc in LIVE:
                LIVE.remove(proc)
    # Until the server is idle: what it does after the last byte (storing, publishing) is
    # part of the cold GB's cost.
    wait_quiet([pid])
    return ManyResult(seconds, total, tree_cpu_seconds(pid) - cpu0)


def many_blobs(bench: Bench) -> list[seed.Blob]:
    """The blobs fetched at once (pushed on first use; fresh content every run)."""
    blobs: list[seed.Blob] | None = getattr(bench, "_many_blobs", None)
    if blobs is None:
        pusher = seed.Pusher(bench.upstream.url)
        salt = seed.salt()
        blobs = [
            seed.random_blob(pusher, "bench/blobs", bench.p.many_blob, f"many{i}", salt)
            for i in range(bench.p.many_count)
        ]
        bench._many_blobs = blobs  # type: ignore[attr-defined]
    return blobs


def _blob_urls(subject: servers.Subject, blobs: list[seed.Blob]) -> list[str]:
    return [f"{subject.url}/v2/bench/blobs/blobs/{b.digest}" for b in blobs]


def measure_many(bench: Bench, key: str, title: str, subjects: list[servers.Subject]) -> None:
    """``many_count`` different cold blobs at once through each (fresh) subject."""
    p = bench.p
    blobs = many_blobs(bench)
    speed = bench.figure(key, title, "MB/s", "higher")
    cpu = bench.figure(f"{key}_cpu", f"CPU per GB served, {title}", "CPU s/GB", "lower")
    bench.log(title)
    timeout = max(120.0, p.many_blob * len(blobs) / (10 * MB))
    for _rep, subject in bench._turns(subjects):

        def one(subject: servers.Subject = subject) -> list[float]:
            subject.fresh()
            r = stream_many(_blob_urls(subject, blobs), subject.pid, p.many_blob, timeout)
            bench.log(f"  {subject.name:12} {r.mb_per_s:8.0f} MB/s, {r.cpu_s_per_gb:.2f} CPU s/GB")
            return [r.mb_per_s, r.cpu_s_per_gb]

        bench._measure([speed, cpu], subject.name, one)


def cold_many(bench: Bench) -> None:
    assert bench.dist and bench.reg
    p = bench.p
    title = f"{p.many_count} cold {_size(p.many_blob)} blobs at once, plain HTTP"
    measure_many(bench, "cold_many", title, [bench.dist, bench.reg])


# -- TLS upstream ----------------------------------------------------------------------------


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem)."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.cert_chain_pems[0].write_to_path(str(paths[1]))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(paths[1]), append=True)
    cert.private_key_pem.write_to_path(str(paths[2]))
    return paths


def tls_upstream(workdir: Path, data_root: Path, cert: Path, key: Path) -> servers.Subject:
    """``docker-registry`` over TLS, serving the plain upstream's storage directory."""
    d = workdir / "upstream-tls"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = servers._registry_config(data_root, port, None)
    http = config["http"]
    assert isinstance(http, dict)
    http["tls"] = {"certificate": str(cert), "key": str(key)}
    path = d / "config.yml"
    path.write_text(json.dumps(config, indent=2))
    server = Server(
        "upstream-tls",
        [servers.REGISTRY_BINARY, "serve", str(path)],
        d / "registry.log",
        f"https://127.0.0.1:{port}/v2/",
        cwd=d,
    )
    return servers.Subject("upstream-tls", server, port, None)


@dataclass
class TlsSetup:
    upstream: servers.Subject
    dist: servers.Subject
    reg: servers.Subject
    ca: Path


def _trusting(subject: servers.Subject, ca: Path) -> None:
    env = dict(subject.server.env if subject.server.env is not None else os.environ)
    env["SSL_CERT_FILE"] = str(ca)
    subject.server.env = env


def tls_setup(bench: Bench) -> TlsSetup:
    """The TLS upstream and the two proxies in front of it (started once, stopped with all)."""
    existing: TlsSetup | None = getattr(bench, "_tls", None)
    if existing is not None:
        return existing
    work = bench.workdir / "tls"
    ca, cert, key = _tls_files(work / "certs")
    upstream = tls_upstream(work, bench.workdir / "upstream" / "data", cert, key)
    # The bench's own readiness probe of the TLS upstream (urllib) must trust the CA too; the
    # scenario runs last, and every other server here is plain HTTP on 127.0.0.1.
    os.environ["SSL_CERT_FILE"] = str(ca)
    upstream.start()
    dist = servers.distribution(work, upstream.url.replace("http://", "https://"))
    reg = servers.regproxy(
        work,
        upstream.url.replace("http://", "https://"),
        bench.p.tag_ttl,
        bench.p.regproxy_cmd,
    )
    for subject in (dist, reg):
        _trusting(subject, ca)
        subject.start()
    setup = TlsSetup(upstream, dist, reg, ca)
    bench._tls = setup  # type: ignore[attr-defined]
    return setup


def cold_tls(bench: Bench) -> None:
    p = bench.p
    assert bench.huge
    tls = tls_setup(bench)
    title = f"cold {_size(p.huge_blob)} blob, one client, TLS upstream"
    speed = bench.figure("tls_stream_speed", f"Throughput, {title}", "MB/s", "higher")
    cpu = bench.figure("tls_stream_cpu", f"CPU per GB served, {title}", "CPU s/GB", "lower")
    bench.log(title)
    timeout = max(120.0, p.huge_blob / (10 * MB))
    huge = bench.huge
    for _rep, subject in bench._turns([tls.dist, tls.reg]):

        def one(subject: servers.Subject = subject) -> list[float]:
            subject.fresh()
            url = f"{subject.url}/v2/bench/blobs/blobs/{huge.digest}"
            r = load.stream(url, subject.pid, huge.size, timeout)
            bench.log(f"  {subject.name:12} {r.mb_per_s:8.0f} MB/s, {r.cpu_s_per_gb:.2f} CPU s/GB")
            return [r.mb_per_s, r.cpu_s_per_gb]

        bench._measure([speed, cpu], subject.name, one)
    title = f"{p.many_count} cold {_size(p.many_blob)} blobs at once, TLS upstream"
    measure_many(bench, "tls_many", title, [tls.dist, tls.reg])


def targets(f: dict[str, Figure]) -> list[Target]:
    """The cold-path targets (issue #13, raised by #21), as ratios of regproxy to distribution."""
    wanted = [
        ("stream_speed", "≥ 1x distribution", ">=", 1.0),
        ("stream_cpu", "≤ 1.2x distribution", "<=", 1.2),
        ("cold_many", "≥ 1.2x distribution", ">=", 1.2),
        ("tls_stream_speed", "≥ 1.2x distribution", ">=", 1.2),
        ("tls_many", "≥ 1.2x distribution", ">=", 1.2),
    ]
    return [
        Target(key, text, f[key].ratio("regproxy") if key in f else None, op, limit)
        for key, text, op, limit in wanted
    ]


def _size(n: int) -> str:
    mib = 1024 * 1024
    if n >= mib and n % mib == 0:
        return f"{n // mib} MiB" if n < 1024 * mib else f"{n // (1024 * mib)} GiB"
    return f"{n / MB:.0f} MB"
