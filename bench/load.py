"""Load generators and clients: wrk (throughput, requests/s), skopeo (pulls), curl (one stream).

Every run is bounded: wrk by ``-d`` (and a subprocess timeout), skopeo and curl by timeouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cores import busy, tree_cpu_seconds
from bench.procs import LIVE, run, tree_pss_kib, wait_quiet

WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH {"bytes": %d, "requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.bytes, summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    bytes: int
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    #: The server's busy cores over the run, its process tree counted (bench/cores.py).
    server_cores: float | None = None
    #: The load generator's busy cores over the run.
    client_cores: float | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    server_pid: int | None = None,
    cpus: str | None = None,
) -> WrkResult:
    """``wrk -c connections -d seconds`` against ``url``; non-2xx answers count as errors.
    ``cpus``: run wrk on these CPUs only (``taskset -c``).

    With ``server_pid``, also the busy cores of that server (and of wrk) over the run. A body
    still arriving when the run ends counts with the bytes received so far (wrk counts every
    read), so on bodies larger than a run moves per connection the figure is bytes, not requests.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
        script = f.name
    try:
        argv = [
            *(["taskset", "-c", cpus] if cpus else []),
            binary,
            "-t",
            str(min(threads, connections)),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            f"{int(timeout)}s",
            "-s",
            script,
        ]
        for key, value in (headers or {}).items():
            argv += ["-H", f"{key}: {value}"]
        with busy(server_pid) as cores:
            out = run([*argv, url], timeout=seconds + timeout + 30).stdout
    finally:
        Path(script).unlink(missing_ok=True)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out[-2000:]}")
    s = json.loads(line[6:])
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    if s["requests"] == 0 and s["bytes"] == 0:
        raise RuntimeError(f"wrk received nothing from {url}:\n{out[-2000:]}")
    if errors > max(2, s["requests"] // 100):
        raise RuntimeError(f"wrk saw {errors} errors in {s['requests']} requests: {s}")
    return WrkResult(
        s["bytes"],
        s["requests"],
        s["duration_us"] / 1e6,
        errors,
        s["p50_us"] / 1e3,
        s["p99_us"] / 1e3,
        cores.server_cores,
        cores.client_cores,
    )


def bigload(
    url: str,
    *,
    seconds: float,
    connections: int,
    timeout: float = 60.0,
    server_pid: int | None = None,
) -> WrkResult:
    """``python -m bench.bigload``: like :func:`wrk`, for large bodies (see bench/bigload.py)."""
    script = Path(__file__).with_name("bigload.py")
    with busy(server_pid) as cores:
        out = run(
            [
                sys.executable,
                str(script),
                url,
                "-c",
                str(connections),
                "-d",
                str(seconds),
                "--timeout",
                str(timeout),
            ],
            timeout=seconds + timeout + 30,
        ).stdout
    s = json.loads(out.strip().splitlines()[-1])
    if s["requests"] == 0 and s["bytes"] == 0:
        raise RuntimeError(f"bigload received nothing from {url}: {s}")
    if s["errors"] > max(2, s["requests"] // 100):
        raise RuntimeError(f"bigload saw {s['errors']} errors in {s['requests']} requests")
    return WrkResult(
        s["bytes"],
        s["requests"],
        s["seconds"],
        s["errors"],
        0.0,
        0.0,
        cores.server_cores,
        cores.client_cores,
    )


def skopeo_argv(host: str, reference: str, dest: Path) -> list[str]:
    return [
        shutil.which("skopeo") or "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        f"docker://{host}/{reference}",
        f"dir:{dest}",
    ]


def pull(host: str, reference: str, scratch: Path, timeout: float) -> float:
    """Wall seconds of one ``skopeo copy docker://host/ref dir:…`` (the copy is then deleted)."""
    dest = Path(tempfile.mkdtemp(prefix="pull-", dir=scratch))
    try:
        t0 = time.perf_counter()
        run(skopeo_argv(host, reference, dest), timeout=timeout)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def pull_many(
    host: str, reference: str, scratch: Path, count: int, timeout: float
) -> tuple[float, list[str]]:
    """``count`` concurrent skopeo pulls: wall seconds until all finished, and the failures.

    A failed pull is reported, not raised: a cache that fails some of many concurrent pulls is a
    result worth a number (the wall time of the rest) and a note.
    """
    dests = [Path(tempfile.mkdtemp(prefix="pull-", dir=scratch)) for _ in range(count)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.perf_counter()
        for dest in dests:
            proc = subprocess.Popen(
                skopeo_argv(host, reference, dest),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            LIVE.append(proc)
            procs.append(proc)
        deadline = t0 + timeout
        failures = []
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{count} concurrent pulls took more than {timeout}s") from None
            if proc.returncode != 0:
                failures.append(err.decode(errors="replace").strip()[-300:])
        wall = time.perf_counter() - t0
        if len(failures) == count:
            raise RuntimeError(f"all {count} pulls failed: {failures[0]}")
        return wall, failures
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc in LIVE:
                LIVE.remove(proc)
        for dest in dests:
            shutil.rmtree(dest, ignore_errors=True)


@dataclass
class StreamResult:
    seconds: float
    bytes: int
    #: Peak proportional set size of the server's process tree (``procs.tree_pss_kib``).
    peak_mem_mb: float
    cpu_s: float

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / (self.bytes / 1e9)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def stream(url: str, pid: int, expected: int, timeout: float) -> StreamResult:
    """GET ``url`` with curl into /dev/null; the server's peak memory and CPU seconds meanwhile.

    Both of the server's whole process tree: CPU from bench/cores.py; memory its proportional
    set size (``procs.tree_pss_kib``), sampled every 20 ms from before the request until the
    server is idle again, the largest sample kept. Call it on a fresh server process.
    """
    peak = [tree_pss_kib(pid)]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            with contextlib.suppress(KeyError):
                peak.append(tree_pss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = _stream(url, pid, expected, timeout)
    finally:
        sampling.set()
        sampler.join()
    return dataclasses.replace(result, peak_mem_mb=max(peak) / 1024)


def _stream(url: str, pid: int, expected: int, timeout: float) -> StreamResult:
    """:func:`stream` but for the memory (``peak_mem_mb`` 0)."""
    cpu0 = tree_cpu_seconds(pid)
    t0 = time.perf_counter()
    out = run(
        [
            shutil.which("curl") or "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "--max-time",
            str(int(timeout)),
            url,
        ],
        timeout=timeout + 10,
    ).stdout
    seconds = time.perf_counter() - t0
    got = int(out.strip() or 0)
    if got != expected:
        raise RuntimeError(f"streamed {got} bytes of {expected} from {url}")
    # Until the server is idle: what it does after the last byte (storing, publishing) is
    # part of the cold GB's cost.
    wait_quiet([pid])
    cpu = tree_cpu_seconds(pid) - cpu0
    return StreamResult(seconds, got, 0.0, cpu)


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 300.0) -> int:
    """One GET, body discarded; returns its length (raises unless 200)."""
    import urllib.request

    req = urllib.request.Request(url, headers=headers or {})
    n = 0
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}")
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
    return n
