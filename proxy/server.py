"""Serving the app: the listening socket, shutdown on SIGTERM, and a deadline for request heads.

aiohttp has no timeout for receiving a request's head, so a client sending its headers a byte at a
time (slowloris) would hold a connection, and a file descriptor, for as long as it likes. Each
connection here must deliver a complete request head (up to the blank line) within
``header_timeout`` of its first byte, else it is closed. Between requests of a keep-alive
connection aiohttp's ``keepalive_timeout`` applies. The guard wraps aiohttp's protocol and
forwards everything else to it unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

from proxy.registry.keys import DRAINING

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0
_END_OF_HEAD = b"\r\n\r\n"


class HeadDeadline(asyncio.Protocol):
    """Closes the connection if a request head does not arrive within ``timeout`` seconds."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self._waiting = True  # for the head of the first request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            peer = self._transport.get_extra_info("peername")
            log.warning("closing a connection whose request head took too long peer=%s", peer)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiting:
            seen = self._tail + data
            if _END_OF_HEAD in seen:
                self._waiting = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A site whose connections get a :class:`HeadDeadline`, on aiohttp's public site API
    (``BaseSite``: ``start`` registers it with the runner, ``stop`` unregisters it;
    ``runner.server`` is the protocol factory). The listening server is the site's own, not a
    copy of ``TCPSite.start`` and its private fields. Subclasses say where to listen."""

    def __init__(
        self, runner: web.BaseRunner, *, ssl_context: ssl.SSLContext | None, head_timeout: float
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.runner = runner
        self.tls = ssl_context
        self.head_timeout = head_timeout
        self.listener: asyncio.Server | None = None

    @abstractmethod
    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        """Start listening, with ``factory`` making each connection's protocol."""

    def _url(self, host: str, port: int) -> str:
        return str(URL.build(scheme="https" if self.tls else "http", host=host, port=port))

    async def start(self) -> None:
        await super().start()
        server = self.runner.server
        assert server is not None
        timeout = self.head_timeout
        self.listener = await self.listen(lambda: HeadDeadline(server(), timeout))

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await super().stop()


class GuardedTCPSite(GuardedSite):
    """Listens on ``host:port`` (``host`` None: every address, IPv4 and IPv6)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        head_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, head_timeout=head_timeout)
        self.host = host
        self.port = port

    @property
    def name(self) -> str:
        sockets = self.listener.sockets if self.listener is not None else ()
        port = sockets[0].getsockname()[1] if sockets else self.port  # the port bound
        return self._url(self.host or "0.0.0.0", port)

    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, self.host, self.port, ssl=self.tls)


class GuardedSockSite(GuardedSite):
    """Listens on a socket bound already (by a parent process, for instance)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
        head_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, head_timeout=head_timeout)
        self.sock = sock

    @property
    def name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return self._url(host, port)

    async def listen(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(factory, sock=self.sock, ssl=self.tls)


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    access_log_class: type[AbstractAccessLogger],
    head_timeout: float,
    sockets: Sequence[socket.socket] = (),
    peer_socket: socket.socket | None = None,
    ready: Callable[[], None] | None = None,
    on_reload: Callable[[], None] | None = None,
    drain_delay: float = 0.0,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``app`` until SIGTERM or SIGINT, then shut down gracefully: /readyz answers 503
    at once, and requests are still served for ``drain_delay`` seconds (load balancers take the
    replica out meanwhile) and while ``drain`` runs (downloads finish or are handed over to
    other replicas), whichever ends later; a second signal ends the wait. Then the listener
    closes. SIGHUP calls ``on_reload`` (which logs its own failures).

    ``sockets``: listen on these (bound by the parent of the workers) instead of ``host:port``;
    ``peer_socket``: also serve plain HTTP there (a worker's loopback address for the others);
    ``ready``: called once every site listens.
    """
    runner = web.AppRunner(
        app,
        access_log_class=access_log_class,
        access_log=logging.getLogger("proxy.access"),
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        handle_signals=False,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        sites: list[GuardedSite] = [
            GuardedSockSite(runner, sock, ssl_context=ssl_context, head_timeout=head_timeout)
            for sock in sockets
        ] or [
            GuardedTCPSite(
                runner,
                host or None,
                port,
                ssl_context=ssl_context,
                head_timeout=head_timeout,
            )
        ]
        if peer_socket is not None:
            sites.append(GuardedSockSite(runner, peer_socket, head_timeout=head_timeout))
        for site in sites:
            await site.start()
        log.info("listening on %s", ", ".join(site.name for site in sites))
        if ready is not None:
            ready()
        await stop.wait()
        stop.clear()
        draining = app.get(DRAINING)
        if draining is not None:
            draining.set()
        waits: list[asyncio.Future[object]] = []
        if drain_delay > 0:
            log.info("draining: /readyz answers 503, serving %gs more", drain_delay)
            waits.append(asyncio.ensure_future(asyncio.sleep(drain_delay)))
        if drain is not None:
            waits.append(asyncio.ensure_future(drain()))
        second: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        pending: set[asyncio.Future[object]] = set(waits)
        while pending and not second.done():
            _, pending = await asyncio.wait({*pending, second}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(second)
        for task in (*waits, second):
            task.cancel()
        for result in await asyncio.gather(*waits, second, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("draining failed error=%r", result)
    finally:
        await runner.cleanup()
