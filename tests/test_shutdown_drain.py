"""Leaving a fleet cleanly, and being reachable from it on IPv6.

On SIGTERM /readyz answers 503 at once while pulls are still served for ``--drain-delay``, so a
load balancer (a Kubernetes readiness probe) takes the replica out before it stops taking
requests. ``--listen :PORT`` serves IPv4 and IPv6 clients alike (a pod IP may be either).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.front import Drip, Front, blob
from tests.harness.images import seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.harness.tools import free_port
from tests.test_operations import pull
from tests.test_read_path import fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]


async def test_sigterm_turns_readiness_off_before_the_listener_closes(
    registry: Registry, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(registry, "library/drain", "1", platforms=("linux/amd64",), single=True)
    proxy = proxy_factory(registry.url, extra_args=["--drain-delay", "2s"])
    assert (await fetch(f"{proxy.url}/readyz"))[0] == 200
    assert proxy.pid is not None
    os.kill(proxy.pid, signal.SIGTERM)
    sent = time.monotonic()
    status, body = 200, b""
    while status == 200 and time.monotonic() - sent < 1:  # the signal arrives asynchronously
        status, _, body = await fetch(f"{proxy.url}/readyz")
    assert status == 503 and b"draining" in body
    await pull(proxy, image)  # still served while load balancers let go of the replica
    await asyncio.to_thread(wait_for_exit, proxy, sent + 10)
    assert not proxy.running
    assert time.monotonic() - sent >= 2
    assert proxy.stop() == 0


def wait_for_exit(proxy: ProxyProcess, deadline: float) -> None:
    while proxy.running and time.monotonic() < deadline:
        time.sleep(0.05)


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_listen_on_every_address_serves_ipv4_and_ipv6(
    registry: Registry, proxy_factory: ProxyFactory
) -> None:
    port = free_port()
    proxy = proxy_factory(registry.url, port=port, extra_args=["--listen", f":{port}"])
    for url in (f"http://127.0.0.1:{port}/v2/", f"http://[::1]:{port}/v2/"):
        status, _, _ = await fetch(url)
        assert status == 200, url
    assert proxy.running


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_replicas_stream_from_each_other_at_a_bare_ipv6_advertise_url(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """``http://$(POD_IP):5000`` on an IPv6 pod: ``http://::1:PORT``, unbracketed."""
    image = seed_image(
        registry, "library/six", "1", platforms=("linux/amd64",), layer_sizes=(3 * 1024 * 1024,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(4 * 1024 * 1024), times=2)
    ports = [free_port(), free_port()]
    proxies = [
        proxy_factory(
            upstream.url,
            port=port,
            storage=tmp_path / "volume",
            extra_args=[
                *("--listen", f":{port}", "--redis", redis_server.url),
                *("--advertise-url", f"http://::1:{port}"),
            ],
        )
        for port in ports
    ]
    urls = [f"http://[::1]:{p}/v2/library/six/blobs/{digest}" for p in ports for _ in range(3)]
    for status, _, body in await asyncio.gather(*(fetch(u) for u in urls)):
        assert status == 200 and sha256(body) == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    # the follower streamed the download from its owner over IPv6 (not from the store, later)
    logs = "".join(p.logs() for p in proxies)
    assert f"path=/_regproxy/peer/blobs/{digest} status=200" in logs
    assert "peer not reachable" not in logs
