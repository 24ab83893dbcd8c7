"""A cached blob's answer (``proxy/cache/blobfile.py``) and the zero-copy send under it
(``proxy/cache/sendfile.py``).

The answer is held to what aiohttp's ``FileResponse`` answered before it (ranges, ``If-Range``,
``304`` to a matching ``If-None-Match`` or ``If-Modified-Since``, HEAD) through a real proxy in
front of the real registry. The send is held to its promise on both event loops, uvloop as
served and asyncio's: every byte in order to a client that reads slower than the file can be
sent (so that the send has to wait for room many times), and a cancelled send leaves no fd and
no writer behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.cache import sendfile
from tests.harness.front import Front
from tests.harness.images import SeededRegistry
from tests.harness.proxyproc import ProxyProcess
from tests.test_read_path import fetch

MiB = 1024 * 1024


@pytest.fixture
def proxy(seeded_registry: SeededRegistry, front: Callable[..., Front], proxy_factory: Any) -> Any:
    return proxy_factory(front(seeded_registry.registry).url)


async def _cached(url: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, headers, _ = await fetch(url, "HEAD")
        if status == 200 and headers.get("X-Cache") == "HIT":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("blob never became a cache hit")


async def test_cached_blob_answers_ranges_and_conditions_as_a_file_server(
    proxy: ProxyProcess, seeded_registry: SeededRegistry
) -> None:
    image = seeded_registry["library/redis:7"]
    digest = image.child("linux/amd64").layers[0]
    data = image.blobs[digest]
    size = len(data)
    url = f"{proxy.url}/v2/library/redis/blobs/{digest}"
    status, _, body = await fetch(url)
    assert (status, body) == (200, data)
    await _cached(url)

    status, headers, body = await fetch(url)
    assert (status, headers["X-Cache"], body) == (200, "HIT", data)
    assert headers["Content-Length"] == str(size)
    assert headers["Docker-Content-Digest"] == digest
    assert headers["ETag"] == f'"{digest}"' and headers["Accept-Ranges"] == "bytes"
    last_modified = headers["Last-Modified"]

    for rng, want in [
        ("bytes=100-199", (100, 200)),
        ("bytes=-100", (size - 100, size)),
        (f"bytes=-{size + 5}", (0, size)),
        (f"bytes={size - 10}-", (size - 10, size)),
        (f"bytes=10-{size + 100}", (10, size)),
    ]:
        status, headers, body = await fetch(url, headers={"Range": rng})
        start, stop = want
        assert status == 206, rng
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}", rng
        assert body == data[start:stop], rng
    status, headers, _ = await fetch(url, headers={"Range": f"bytes={size}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")

    # If-Range with a date before the file's: the range is ignored, the whole blob comes.
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    status, _, body = await fetch(url, headers={"Range": "bytes=0-9", "If-Range": old})
    assert (status, body) == (200, data)
    status, _, body = await fetch(url, headers={"Range": "bytes=0-9", "If-Range": last_modified})
    assert (status, body) == (206, data[:10])

    for method in ("GET", "HEAD"):
        status, headers, body = await fetch(url, method, headers={"If-None-Match": f'"{digest}"'})
        assert (status, body, headers["ETag"]) == (304, b"", f'"{digest}"'), method
    status, _, body = await fetch(url, headers={"If-None-Match": '"sha256:other"'})
    assert (status, body) == (200, data)
    status, _, body = await fetch(url, headers={"If-Modified-Since": last_modified})
    assert (status, body) == (304, b"")
    status, _, body = await fetch(url, headers={"If-Modified-Since": old})
    assert (status, body) == (200, data)

    status, headers, body = await fetch(url, "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(size))
    assert "Traceback" not in proxy.logs()


# -- the send itself ---------------------------------------------------------------------------

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def _run(loop_name: str, coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(coro)


class _SlowReader(threading.Thread):
    """A client on the other end of a TCP connection: reads in small pieces with pauses."""

    def __init__(self, sock: socket.socket, pause_every: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.pause_every = pause_every
        self.digest = hashlib.sha256()
        self.count = 0

    def run(self) -> None:
        since_pause = 0
        while True:
            data = self.sock.recv(64 * 1024)
            if not data:
                return
            self.digest.update(data)
            self.count += len(data)
            since_pause += len(data)
            if since_pause >= self.pause_every:
                since_pause = 0
                time.sleep(0.005)


async def _connected() -> tuple[asyncio.Transport, socket.socket, socket.socket]:
    """A server-side transport of a loopback TCP connection, its client socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server)
    return transport, client, server


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_slow_client_gets_every_byte_in_order(tmp_path: Path, loop_name: str) -> None:
    data = os.urandom(12 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)

    async def main() -> tuple[int, int, str, int]:
        transport, client, _ = await _connected()
        reader = _SlowReader(client, pause_every=MiB)
        reader.start()
        fd = os.open(path, os.O_RDONLY)
        try:
            transport.write(b"HEAD")  # bytes the transport holds before the file's
            sent = await sendfile.sendfile_to_transport(transport, fd, 100, len(data) - 100)
            short = await sendfile.sendfile_to_transport(transport, fd, len(data) - 10, 50)
        finally:
            os.close(fd)
            transport.close()
        await asyncio.to_thread(reader.join, 30)
        client.close()
        return sent, short, reader.digest.hexdigest(), reader.count

    sent, short, digest, count = _run(loop_name, main())
    assert (sent, short) == (len(data) - 100, 10)
    want = b"HEAD" + data[100:] + data[-10:]
    assert (count, digest) == (len(want), hashlib.sha256(want).hexdigest())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_cancelled_send_leaves_no_fd_and_no_writer(tmp_path: Path, loop_name: str) -> None:
    """A client that stops reading, a send cancelled (a shutdown): no fd of the send is left
    open, and the loop watches the socket no more (a writer left behind would fire in a busy
    loop once the socket drains)."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(16 * MiB))

    async def main() -> tuple[int, int, int]:
        transport, client, _ = await _connected()
        fds_before = len(os.listdir("/proc/self/fd"))
        fd = os.open(path, os.O_RDONLY)
        task = asyncio.ensure_future(sendfile.sendfile_to_transport(transport, fd, 0, 16 * MiB))
        await asyncio.sleep(0.3)  # the client reads nothing: the send waits for room
        waiting = len(os.listdir("/proc/self/fd"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        os.close(fd)
        fds_after = len(os.listdir("/proc/self/fd"))
        # The client drains its side: a writer left on the loop would now run every iteration.
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while client.recv(MiB):
                pass
        loop = asyncio.get_running_loop()
        cpu0 = time.process_time()
        await asyncio.sleep(0.3)
        idle_cpu = time.process_time() - cpu0
        transport.close()
        client.close()
        assert loop.is_running()
        return waiting - fds_before, fds_after - fds_before, round(idle_cpu, 2)

    held, left, idle_cpu = _run(loop_name, main())
    assert held == 2  # the file and the duplicate of the socket the writer watches
    assert left == 0
    assert idle_cpu < 0.1
