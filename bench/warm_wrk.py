"""Warm blobs with ``wrk -t1 -c32 -d4s``: distribution against regproxy builds (issue #21).

``python -m bench.warm_wrk [--repeat N] [--build NAME=DIR[,KEY=VALUE...] ...] [--sizes 32,1]
[--server-cpus 0 --client-cpus 1]``

One upstream (Debian's ``docker-registry``), distribution's pull-through cache in front of it, and
one regproxy per ``--build`` (``NAME=DIR``: ``python -m proxy`` run from that source tree, with
the environment variables that follow; default this tree as ``regproxy``), every cache warmed
with a 1 MiB and a 32 MiB blob. Within a repetition each size takes every server in turn, the
first rotating from one repetition to the next. For each run: MB/s (wrk's bytes / its duration)
and the server's busy cores (its CPU seconds over the run / the run's wall time). Prints medians
and min-max spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench import load, seed, servers
from bench.procs import install_signal_handlers, stop_all, wait_quiet

MiB = 1024 * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_wrk")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sizes", default="32,1", help="blob sizes in MiB")
    parser.add_argument("--build", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--no-distribution", action="store_true")
    parser.add_argument("--server-cpus", help="run every server on these CPUs (taskset -c 0)")
    parser.add_argument("--client-cpus", help="run wrk on these CPUs (taskset -c 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_wrk.jsonl"))
    args = parser.parse_args(argv)
    builds = [tuple(b.split("=", 1)) for b in args.build] or [("regproxy", str(servers.REPO_ROOT))]
    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    install_signal_handlers()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="regproxy-warm-") as tmp, open(args.out, "a") as out:
        work = Path(tmp)
        try:
            upstream = servers.upstream(work)
            upstream.start()
            pusher = seed.Pusher(upstream.url)
            salt = seed.salt()
            blobs = {s: seed.random_blob(pusher, "bench/blobs", s, f"w{s}", salt) for s in sizes}
            subjects: list[servers.Subject] = []
            if not args.no_distribution:
                subjects.append(servers.distribution(work, upstream.url))
            for name, spec in builds:
                src, *assignments = spec.split(",")
                subject = servers.regproxy(work / name, upstream.url)
                subject.name = name
                env = dict(subject.server.env or os.environ)
                env.update(a.split("=", 1) for a in assignments)
                env["PYTHONPATH"] = src
                subject.server.env = env
                subject.server.cwd = Path(src)
                subjects.append(subject)
            for subject in subjects:
                if args.server_cpus:  # taskset execs: the PID stays the server's
                    subject.server.argv[:0] = ["taskset", "-c", args.server_cpus]
                subject.start()
                for blob in blobs.values():
                    got = load.get(f"{subject.url}/v2/bench/blobs/blobs/{blob.digest}")
                    assert got == blob.size, (subject.name, got)
            rows = []
            for rep in range(args.repeat):
                k = rep % len(subjects)
                for size, blob in blobs.items():
                    for subject in subjects[k:] + subjects[:k]:
                        wait_quiet([s.pid for s in subjects])
                        url = f"{subject.url}/v2/bench/blobs/blobs/{blob.digest}"
                        r = load.wrk(
                            url,
                            seconds=args.seconds,
                            connections=args.connections,
                            threads=1,
                            server_pid=subject.pid,  # its process tree (bench/cores.py)
                            cpus=args.client_cpus,
                        )
                        cores = r.server_cores or 0.0
                        row = {
                            "rep": rep,
                            "mib": size // MiB,
                            "server": subject.name,
                            "mb_s": round(r.mb_per_s, 1),
                            "cores": round(cores, 3),
                            "rps": round(r.rps, 1),
                        }
                        rows.append(row)
                        print(json.dumps(row), file=out, flush=True)
                        print(
                            f"{rep} {size // MiB:3} MiB {subject.name:14} {r.mb_per_s:7.0f} MB/s "
                            f"{cores:5.2f} cores",
                            flush=True,
                        )
            summarize(rows, [s.name for s in subjects])
        finally:
            stop_all()


def summarize(rows: list[dict[str, object]], names: list[str]) -> None:
    base = names[0]
    print(f"\n| blob | {' | '.join(names)} |")
    print("| --- |" + " ---: |" * len(names))
    for mib in sorted({int(r["mib"]) for r in rows}, reverse=True):  # type: ignore[call-overload]
        cells = []
        med: dict[str, float] = {}
        for name in names:
            got = [r for r in rows if r["mib"] == mib and r["server"] == name]
            mbs = [float(r["mb_s"]) for r in got]  # type: ignore[arg-type]
            cores = [float(r["cores"]) for r in got]  # type: ignore[arg-type]
            med[name] = statistics.median(mbs)
            ratio = "" if name == base else f", {med[name] / med[base]:.2f}x {base}"
            cells.append(
                f"{med[name]:.0f} MB/s ({min(mbs):.0f}-{max(mbs):.0f}{ratio}), "
                f"{statistics.median(cores):.2f} cores ({min(cores):.2f}-{max(cores):.2f})"
            )
        print(f"| warm {mib} MiB | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
