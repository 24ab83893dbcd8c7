"""A load generator for large responses: ``python -m bench.bigload URL -c 32 -d 5``.

The warm blob figures use wrk (``--blob-client bigload`` selects this one): this is the
cross-check for large bodies. wrk reads 8 KiB per ``read``, so on 32 and 256 MiB blobs its one
thread fills its core while nginx or regproxy use a fifth of theirs (bench/README.md, "Which
client": 1.3-1.8 GB/s from nginx with wrk -t1, 2.7-3.5 GB/s with this). This client keeps one
thread per connection (``-c``), each sending keep-alive GETs back to back and reading bodies with
``recv_into`` a 1 MiB buffer (the GIL is released in the call, so threads hardly contend and the
bytes are still copied to user space, as a real client's are). It prints one JSON line:
bytes, requests, seconds, errors. Bounded: it stops at ``-d`` seconds (a response in progress
counts with the bytes received so far) and every socket has a timeout.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

BUF = 1024 * 1024


class Totals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests = 0
        self.errors = 0


def _worker(
    host: str, port: int, path: str, stop_at: float, totals: Totals, timeout: float
) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench-bigload\r\n\r\n"
    raw = request.encode()
    buf = bytearray(BUF)
    view = memoryview(buf)
    got = requests = errors = 0
    sock: socket.socket | None = None
    try:
        while time.monotonic() < stop_at:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=timeout)
            sock.sendall(raw)
            # Headers: read until the blank line; whatever body bytes came along count.
            head = b""
            while b"\r\n\r\n" not in head:
                n = sock.recv_into(view, 65536)
                if n == 0:
                    raise ConnectionError("closed in headers")
                head += bytes(view[:n])
            header, _, body = head.partition(b"\r\n\r\n")
            lines = header.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = next(
                int(ln.split(b":", 1)[1])
                for ln in lines[1:]
                if ln.lower().startswith(b"content-length:")
            )
            got += len(head)
            remaining = length - len(body)
            while remaining > 0:
                n = sock.recv_into(view, min(BUF, remaining))
                if n == 0:
                    raise ConnectionError("closed in body")
                got += n
                remaining -= n
                if time.monotonic() >= stop_at:
                    break
            if remaining > 0:
                break  # the deadline cut this response short
            if status != 200:
                errors += 1
            requests += 1
    except (OSError, ValueError, StopIteration):
        errors += 1
    finally:
        if sock is not None:
            sock.close()
        with totals.lock:
            totals.bytes += got
            totals.requests += requests
            totals.errors += errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bigload")
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-d", "--seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    parts = urlsplit(args.url)
    assert parts.hostname and parts.port
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    totals = Totals()
    start = time.monotonic()
    stop_at = start + args.seconds
    threads = [
        threading.Thread(
            target=_worker,
            args=(parts.hostname, parts.port, path, stop_at, totals, args.timeout),
            daemon=True,
        )
        for _ in range(args.connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + args.timeout + 5)
    seconds = time.monotonic() - start
    json.dump(
        {
            "bytes": totals.bytes,
            "requests": totals.requests,
            "seconds": seconds,
            "errors": totals.errors,
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
