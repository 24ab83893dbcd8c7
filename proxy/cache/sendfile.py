"""Zero-copy sends of file bytes to a client, on any event loop.

aiohttp's ``FileResponse`` uses ``loop.sendfile``; uvloop has none, so aiohttp silently falls back
to reading 256 KiB chunks in the thread pool and writing each to the socket (the benchmark found
60 % of the time of a warm 64 MiB blob there). :func:`sendfile_to_transport` calls ``os.sendfile``
on the transport's socket itself once the transport's own buffer (the headers) is flushed.

The waits cost little (issue #21): the headers are flushed by yielding to the loop (uvloop writes
what was queued at the end of each iteration) rather than by a 0.5 ms sleep loop; as much as the
socket takes is sent before any wait (a 1 MiB blob usually needs none); a send that must wait
registers one writer for its whole length, not an ``add_writer``/``remove_writer`` pair per
``EAGAIN``. With ``wrk -t1 -c32 -d4s`` (bench/warm_wrk.py; figures in bench/RESULTS.md) regproxy
spends 0.13-0.14 CPU s per warm 32 MiB GB either way, and the connections' send buffers stay
full (``ss``: ~4 MB not yet sent on each, the receive window of the client the limit), so that
size is bounded by the client, not by these waits. Sending the rest of a long send from a worker
thread measured no better and was dropped.

Each send first sets ``TCP_NOTSENT_LOWAT`` to :data:`NOTSENT_LOWAT` on the socket, so that the
kernel holds at most that many bytes not yet sent and the socket is writable only below it. Without
it, ``sendfile`` fills the whole send buffer (up to ``tcp_wmem``'s 4 MiB); the client's receive
window, which autotunes from the round trip it measures, stays small, and the bytes queued behind
it go out one window at a time as the client's ACKs arrive, sent by the kernel in the client's
context on loopback (``ss -ti``: rwnd_limited 98 %, the client measuring a 0.05 ms round trip
against nginx's 3 ms; ``wrk`` busy a whole core). With it the server's own writes send, the
window grows as it does for nginx, and ``wrk -t1 -c32`` on a warm 32 MiB blob went from
2,089 to 3,078 MB/s (1.14x → 1.68x distribution in the same run; 1 MiB 2,636 → 2,942), the
server's busy cores 0.51 → 0.94 (bench/RESULTS.md). 128 KiB measured best of 64 KiB-1 MiB.

Only for plain TCP: a TLS transport encrypts in user space, so :func:`can_sendfile` says no and
callers write through the transport instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

#: ``TCP_NOTSENT_LOWAT`` of a socket that sends a file (see the module doc).
NOTSENT_LOWAT = 128 * 1024


def can_sendfile(transport: asyncio.BaseTransport | None) -> bool:
    return (
        transport is not None
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("ssl_object") is None
        and transport.get_extra_info("socket") is not None
        and hasattr(os, "sendfile")
    )


def _sendfile(out: int, file_fd: int, offset: int, count: int) -> int:
    """``os.sendfile``; BlockingIOError when the socket is full, ConnectionResetError when the
    client is gone (EPIPE, ECONNRESET) or the transport closed the socket (EBADF)."""
    try:
        return os.sendfile(out, file_fd, offset, count)
    except (BlockingIOError, ConnectionResetError):
        raise
    except OSError as exc:
        raise ConnectionResetError(f"sendfile failed: {exc.strerror}") from exc


async def _flushed(transport: asyncio.BaseTransport) -> None:
    """Wait until the transport has handed what it holds (the headers) to the kernel.

    uvloop writes what was queued during a loop iteration at its end: one yield is usually
    enough; a socket that the client does not drain takes longer.
    """
    pending: Any = transport  # uvloop's transports are not asyncio.WriteTransport instances
    spins = 0
    while pending.get_write_buffer_size():
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
        await asyncio.sleep(0 if spins < 8 else 0.001)
        spins += 1


async def sendfile_to_transport(
    transport: asyncio.BaseTransport, file_fd: int, offset: int, count: int
) -> int:
    """Send ``count`` bytes of ``file_fd`` from ``offset``; return how many were sent (fewer
    only when the file ends first)."""
    await _flushed(transport)
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise ConnectionResetError("connection lost")
    with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    out = sock.fileno()
    sent = 0
    # As much as the socket takes now: a small blob usually all of it, with no wait at all.
    with contextlib.suppress(BlockingIOError):
        while sent < count:
            n = _sendfile(out, file_fd, offset + sent, count - sent)
            if n == 0:
                return sent
            sent += n
    if sent == count:
        return sent
    return sent + await _on_loop(out, file_fd, offset + sent, count - sent)


async def _on_loop(out: int, file_fd: int, offset: int, count: int) -> int:
    """The rest, sent whenever the socket has room: one writer registration for the whole send
    (on a duplicate of the socket's fd: uvloop refuses ``add_writer`` on a fd one of its
    transports owns), a future per wait."""
    loop = asyncio.get_running_loop()
    dup = os.dup(out)
    waiting: asyncio.Future[None] | None = None

    def wake() -> None:
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    loop.add_writer(dup, wake)
    sent = 0
    try:
        while sent < count:
            try:
                n = _sendfile(dup, file_fd, offset + sent, count - sent)
            except BlockingIOError:
                waiting = loop.create_future()
                await waiting
                continue
            if n == 0:
                break
            sent += n
    finally:
        loop.remove_writer(dup)
        os.close(dup)
    return sent
