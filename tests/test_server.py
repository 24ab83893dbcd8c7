"""``proxy.server.serve`` in process: aiohttp's public site API, the port it really bound, the
head deadline, TLS, and a clean stop on SIGTERM (with warnings as errors, as pytest runs here:
a deprecated aiohttp argument fails these tests)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from proxy.server import GuardedSockSite, serve
from tests.harness.tlsca import LocalCA
from tests.harness.tools import free_port


class _Quiet(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        pass


async def _pong(request: web.Request) -> web.Response:
    return web.Response(text="pong")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_serve_on_port_zero_names_the_bound_port_guards_heads_and_stops_on_sigterm(
    tls: bool, local_ca: LocalCA, caplog: pytest.LogCaptureFixture
) -> None:
    app = web.Application()
    app.router.add_get("/ping", _pong)
    caplog.set_level(logging.INFO, logger="proxy.server")
    server = asyncio.create_task(
        serve(
            app,
            host="127.0.0.1",
            port=0,
            ssl_context=local_ca.server_context() if tls else None,
            access_log_class=_Quiet,
            head_timeout=0.5,
        )
    )
    try:
        scheme = "https" if tls else "http"
        found = None
        for _ in range(200):
            found = re.search(rf"listening on {scheme}://127\.0\.0\.1:(\d+)", caplog.text)
            if found or server.done():
                break
            await asyncio.sleep(0.02)
        assert found, caplog.text
        port = int(found.group(1))
        assert port != 0  # the port bound, not the one asked for

        client_ssl = local_ca.client_context() if tls else False
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{scheme}://127.0.0.1:{port}/ping", ssl=client_ssl) as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "pong")

        # a request head that never ends is cut at the deadline
        ctx: ssl.SSLContext | None = local_ca.client_context() if tls else None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if tls else None
        )
        started = time.monotonic()
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.4 <= time.monotonic() - started < 5
        writer.close()
    finally:
        if not server.done():
            os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop
        await asyncio.wait_for(server, 15)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # the port is closed


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def _head_is_cut(host: str, port: int) -> float:
    """Seconds until the server closes a connection whose request head never ends."""
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    return time.monotonic() - started


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_every_address_means_ipv4_and_ipv6(caplog: pytest.LogCaptureFixture) -> None:
    """``--listen :PORT`` (host empty): one site, both families, both guarded."""
    caplog.set_level(logging.INFO, logger="proxy.server")
    app = web.Application()
    app.router.add_get("/ping", _pong)
    port = free_port()
    server = asyncio.create_task(
        serve(app, host="", port=port, ssl_context=None, access_log_class=_Quiet, head_timeout=0.5)
    )
    try:
        for _ in range(200):
            if "listening on" in caplog.text or server.done():
                break
            await asyncio.sleep(0.02)
        assert "listening on http://0.0.0.0:" in caplog.text, caplog.text
        for host in ("127.0.0.1", "::1"):
            url_host = f"[{host}]" if ":" in host else host
            assert await _get(f"http://{url_host}:{port}/ping") == (200, "pong"), host
            assert 0.4 <= await _head_is_cut(host, port) < 5, host
    finally:
        if not server.done():
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, 15)


async def test_a_site_on_a_socket_bound_already() -> None:
    """GuardedSockSite: a socket bound by someone else (a parent of worker processes)."""
    app = web.Application()
    app.router.add_get("/ping", _pong)
    runner = web.AppRunner(app, access_log_class=_Quiet, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = GuardedSockSite(runner, sock, head_timeout=0.5)
    try:
        await site.start()
        assert site.name == f"http://127.0.0.1:{port}"
        assert await _get(f"http://127.0.0.1:{port}/ping") == (200, "pong")
        assert 0.4 <= await _head_is_cut("127.0.0.1", port) < 5
    finally:
        await runner.cleanup()
    assert runner.sites == set()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
