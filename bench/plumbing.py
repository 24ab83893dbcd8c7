"""threadget against urllib3 on the cold path (issue #20), side by side in one run, alternating.

``python -m bench.plumbing [--repeat N] [--variants threadget,urllib3] [--out FILE.jsonl]``

One upstream (Debian's ``docker-registry``) on plain HTTP and a second one on the same storage
behind TLS (a throwaway CA that regproxy trusts through ``SSL_CERT_FILE``), and one regproxy per
variant and scheme: ``threadget`` is ``python -m proxy``, ``urllib3`` is ``python -m
bench.urllib3get`` (urllib3 makes the threaded blob GETs; ``urllib3-fp``: reading the body with
``http.client``'s ``readinto``, see that module). Each sample is a fresh regproxy (new process,
empty cache) and ``curl`` fetching one cold blob, or four different ones at once, of 64 and
256 MiB: MB/s (all bytes / wall time until the last ends) and the regproxy process's CPU seconds
per GB until it is idle again. Within a repetition every
scenario takes each variant in turn, the first one rotating from one repetition to the next.
Prints medians and the min-max spread of each.

``--micro N``: the clients alone, in this process, without regproxy: N alternating reads of the
256 MiB blob from each upstream into one reused 1 MiB buffer (no hashing, no disk), timed by
wall clock and by this process's CPU time, which the other tenants of a shared machine disturb
far less than the wall-clock figures above.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cold, seed, servers
from bench.procs import install_signal_handlers, stop_all

MiB = 1024 * 1024
SIZES = (64 * MiB, 256 * MiB)
CLIENTS = (1, 4)


def _subject(
    workdir: Path, remote: str, variant: str, ca: Path | None, src: Path | None
) -> servers.Subject:
    command = None if variant == "threadget" else [sys.executable, "-m", "bench.urllib3get"]
    subject = servers.regproxy(workdir, remote, command=command)
    env = dict(subject.server.env or os.environ)
    if src is not None:  # a snapshot of the source, to go on editing this tree meanwhile
        env["PYTHONPATH"] = str(src)
        subject.server.cwd = src
    env["REGPROXY_THREADGET"] = variant
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca)
    subject.server.env = env
    return subject


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plumbing")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--variants", default="threadget,urllib3")
    parser.add_argument("--schemes", default="http,https")
    parser.add_argument("--out", type=Path, default=Path("bench/results/plumbing.jsonl"))
    parser.add_argument("--micro", type=int, default=0, metavar="N")
    parser.add_argument("--src", type=Path, help="run regproxy from this source tree")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    schemes = args.schemes.split(",")
    install_signal_handlers()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="regproxy-plumbing-") as tmp,
        open(args.out, "a") as out,
    ):
        work = Path(tmp)
        try:
            _run(work, variants, schemes, args.repeat, out, args.micro, args.src)
        finally:
            stop_all()


def _run(
    work: Path,
    variants: list[str],
    schemes: list[str],
    repeat: int,
    out: object,
    micro: int,
    src: Path | None,
) -> None:
    upstream = servers.upstream(work)
    upstream.start()
    pusher = seed.Pusher(upstream.url)
    salt = seed.salt()
    blobs = {
        size: [
            seed.random_blob(pusher, "bench/blobs", size, f"b{size}-{i}", salt)
            for i in range(max(CLIENTS))
        ]
        for size in SIZES
    }
    ca, cert, key = cold._tls_files(work / "certs")
    os.environ["SSL_CERT_FILE"] = str(ca)  # the readiness probe of the TLS upstream
    tls = cold.tls_upstream(work, work / "upstream" / "data", cert, key)
    tls.start()
    remotes = {"http": upstream.url, "https": tls.url.replace("http://", "https://")}
    if micro:
        big = blobs[max(SIZES)][0]
        _micro(remotes, schemes, variants, big.digest, big.size, micro)
        return
    subjects = {
        (scheme, v): _subject(
            work / f"{scheme}-{v}", remotes[scheme], v, ca if scheme == "https" else None, src
        )
        for scheme in schemes
        for v in variants
    }
    rows: list[dict[str, object]] = []
    for rep in range(repeat):
        k = rep % len(variants)
        order = variants[k:] + variants[:k]
        for scheme in schemes:
            for clients in CLIENTS:
                for size in SIZES:
                    for v in order:
                        subject = subjects[(scheme, v)]
                        subject.fresh()
                        urls = [
                            f"{subject.url}/v2/bench/blobs/blobs/{b.digest}"
                            for b in blobs[size][:clients]
                        ]
                        r = cold.stream_many(urls, subject.pid, size, 300.0)
                        subject.stop()
                        row = {
                            "rep": rep,
                            "scheme": scheme,
                            "clients": clients,
                            "mib": size // MiB,
                            "variant": v,
                            "mb_s": round(r.mb_per_s, 1),
                            "cpu_s_gb": round(r.cpu_s_per_gb, 3),
                        }
                        rows.append(row)
                        print(json.dumps(row), file=out, flush=True)  # type: ignore[call-overload]
                        print(
                            f"{rep} {scheme:5} {clients}x{size // MiB:3} MiB {v:11} "
                            f"{r.mb_per_s:7.0f} MB/s {r.cpu_s_per_gb:5.2f} CPU s/GB",
                            flush=True,
                        )
    summarize(rows, variants)


def _micro(
    remotes: dict[str, str], schemes: list[str], variants: list[str], digest: str, size: int, n: int
) -> None:
    from bench import urllib3get
    from proxy.fetch import threadget
    from proxy.fetch.rawbody import BUFFER

    view = memoryview(bytearray(BUFFER))
    rows: list[dict[str, object]] = []
    for scheme in schemes:
        url = f"{remotes[scheme]}/v2/bench/blobs/blobs/{digest}"
        for rep in range(n):
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:
                mod: Any = threadget if v == "threadget" else urllib3get
                urllib3get.DIRECT = v == "urllib3-fp"
                cpu0, t0 = time.process_time(), time.perf_counter()
                resp = mod.get(
                    url,
                    {},
                    auth_origin=threadget.origin_of(url),
                    connect_timeout=10,
                    read_timeout=60,
                    user_agent="bench",
                )
                assert resp.status == 200, resp.status
                source = mod.BodySource(resp)
                got = len(resp.buffered)
                poller = select.poll()
                poller.register(source.fileno(), select.POLLIN)
                while got < size:
                    try:
                        n_read = source.readinto(view[: min(len(view), size - got)])
                    except BlockingIOError:
                        poller.poll(1000)
                        continue
                    if n_read == 0:
                        raise RuntimeError("cut")
                    got += n_read
                source.finish(True)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                row = {
                    "micro": True,
                    "scheme": scheme,
                    "clients": 1,
                    "mib": size // MiB,
                    "variant": v,
                    "mb_s": round(size / wall / 1e6, 1),
                    "cpu_s_gb": round(cpu / (size / 1e9), 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    summarize(rows, variants)


def summarize(rows: list[dict[str, object]], variants: list[str]) -> None:
    """Medians (min-max) per scenario and variant, and each variant's ratio to the first."""
    keys = sorted({(r["scheme"], r["clients"], r["mib"]) for r in rows}, key=str)
    base = variants[0]
    print(f"\n| scenario | {' | '.join(variants)} | ratio of medians to {base} |")
    print("| --- |" + " ---: |" * (len(variants) + 1))
    for key in keys:
        cells, med = [], {}
        for v in variants:
            got = [
                r
                for r in rows
                if (r["scheme"], r["clients"], r["mib"]) == key and r["variant"] == v
            ]
            mbs = [float(r["mb_s"]) for r in got]  # type: ignore[arg-type]
            cpu = [float(r["cpu_s_gb"]) for r in got]  # type: ignore[arg-type]
            if not got:
                cells.append("-")
                continue
            med[v] = (statistics.median(mbs), statistics.median(cpu))
            cells.append(
                f"{med[v][0]:.0f} MB/s ({min(mbs):.0f}-{max(mbs):.0f}), "
                f"{med[v][1]:.2f} s/GB ({min(cpu):.2f}-{max(cpu):.2f})"
            )
        ratios = ", ".join(
            f"{v}: {med[v][0] / med[base][0]:.2f}x MB/s, {med[v][1] / med[base][1]:.2f}x CPU"
            for v in variants[1:]
            if v in med and base in med
        )
        scheme, clients, mib = key
        print(f"| {scheme} {clients}x{mib} MiB | {' | '.join(cells)} | {ratios} |")


if __name__ == "__main__":
    main()
