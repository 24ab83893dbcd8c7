"""``python -m bench [--quick] [--repeat N] [--out FILE.json] [--md FILE.md] ...``"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.run import SCENARIOS, MiB, Params, main


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="regproxy vs distribution's pull-through cache vs nginx sendfile, on loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and durations (smoke run)")
    parser.add_argument("--repeat", type=int, help="repetitions per figure (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="duration of each wrk run (default 5)")
    parser.add_argument("--connections", type=int, help="wrk connections (default 32)")
    parser.add_argument("--concurrent-pulls", type=int, help="concurrent cold pulls (default 20)")
    parser.add_argument(
        "--huge-mib", type=int, help="cold streamed blob size in MiB (default 1024)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/latest.json"), help="JSON output file"
    )
    parser.add_argument(
        "--md",
        type=Path,
        default=None,
        help="also write the Markdown table here (default: next to --out, .md)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep servers' data here (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="do not delete the workdir")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also py-spy record regproxy in each scenario (extra runs, not counted) into DIR",
    )
    parser.add_argument(
        "--blob-client",
        choices=("wrk", "bigload"),
        default="wrk",
        help="load generator for the warm blob figures (default wrk -t1; bigload: "
        "bench/bigload.py, one Python thread per connection, see bench/README.md)",
    )
    parser.add_argument(
        "--blob-threads", type=int, help="wrk threads for the warm blob figures (default 1)"
    )
    parser.add_argument(
        "--regproxy-cmd",
        metavar="CMD",
        help="replaces 'python -m proxy' when starting regproxy (A/B a patched build)",
    )
    parser.add_argument(
        "--only",
        metavar="SCENARIO,...",
        help=f"run only these scenarios: {', '.join(SCENARIOS)} (targets of the others: n/a)",
    )
    parser.add_argument(
        "--serve",
        type=float,
        metavar="SECONDS",
        help="only stand everything up, print URLs as JSON and wait SECONDS (to profile by hand)",
    )
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    params = Params.quick() if args.quick else Params()
    if args.repeat is not None:
        params.repeat = max(1, args.repeat)
    if args.seconds is not None:
        params.seconds = max(1.0, args.seconds)
    if args.connections is not None:
        params.connections = max(1, args.connections)
    if args.concurrent_pulls is not None:
        params.concurrent_pulls = max(1, args.concurrent_pulls)
    if args.huge_mib is not None:
        params.huge_blob = max(1, args.huge_mib) * MiB
    params.blob_client = args.blob_client
    if args.blob_threads is not None:
        params.blob_threads = max(1, args.blob_threads)
    if args.only:
        params.only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = set(params.only) - set(SCENARIOS)
        if unknown:
            print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    if args.regproxy_cmd:
        cmd = shlex.split(args.regproxy_cmd)
        if cmd and cmd[0] in ("python", "python3"):
            cmd[0] = sys.executable  # not a shim: the PID measured must be the server's
        params.regproxy_cmd = cmd
    md = args.md if args.md is not None else args.out.with_suffix(".md")
    try:
        main(
            params,
            command=shlex.join(["python", "-m", "bench", *argv]),
            out=args.out,
            md_out=md,
            workdir=args.workdir,
            keep=args.keep,
            profile_dir=args.profile,
            serve=args.serve,
        )
    except KeyboardInterrupt:
        print("interrupted; every server was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
