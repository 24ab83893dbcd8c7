"""Run aiohttp servers on a private thread + event loop.

Test servers (token issuer, fronts) must work from plain sync tests *and* from async tests. An
async fixture would tie the server to the test's loop, and a sync test blocking on a socket would
then starve it. A dedicated thread with its own loop has neither problem: the test thread only
ever talks to it through ``run()`` (``asyncio.run_coroutine_threadsafe`` with a deadline) or via
lock-protected plain data.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from aiohttp import web

T = TypeVar("T")

#: Upper bound for any start/stop handshake with the server thread.
CONTROL_TIMEOUT = 15.0


class LoopThread:
    """A daemon thread running one asyncio event loop until ``close()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let cancelled tasks and async generators finish before the loop goes away so that
        # nothing is collected later with a "never awaited"/"unclosed" warning.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CONTROL_TIMEOUT) -> T:
        """Run *coro* on the thread's loop and return its result (bounded by *timeout*)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread (bounded)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CONTROL_TIMEOUT)


class BackgroundServer:
    """Base for an aiohttp application served on 127.0.0.1 from a ``LoopThread``.

    Subclasses implement ``_make_app()`` and may override ``_on_startup()``/``_on_cleanup()``,
    which run on the server loop. The port is kept across ``stop()``/``start()``. With
    *ssl_context* the server speaks HTTPS (see ``tlsca.LocalCA.server_context()``).
    """

    #: Seconds aiohttp waits for in-flight handlers on shutdown; handlers that stall on purpose
    #: (fault injection) are cancelled after this.
    shutdown_timeout = 1.0
    #: Seconds an idle keep-alive connection is kept open (aiohttp's default).
    keepalive_timeout = 75.0

    def __init__(
        self, name: str, port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._name = name
        self.port = port
        self.ssl_context = ssl_context
        self._loop_thread: LoopThread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with TLS; no trailing slash)."""
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._runner is not None

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    async def _on_startup(self) -> None:
        """Hook run on the server loop before the socket is opened."""

    async def _on_cleanup(self) -> None:
        """Hook run on the server loop after the socket is closed."""

    async def _start(self) -> None:
        await self._on_startup()
        runner = web.AppRunner(
            self._make_app(),
            shutdown_timeout=self.shutdown_timeout,
            keepalive_timeout=self.keepalive_timeout,
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(
            runner, "127.0.0.1", self.port, ssl_context=self.ssl_context, reuse_address=True
        )
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._on_cleanup()

    def start(self) -> None:
        """Start serving (idempotent). Returns once the socket accepts connections."""
        if self._runner is not None:
            return
        if self._loop_thread is None:
            self._loop_thread = LoopThread(self._name)
        self._loop_thread.run(self._start())

    def stop(self) -> None:
        """Stop serving and end the thread (idempotent)."""
        thread, self._loop_thread = self._loop_thread, None
        if thread is None:
            return
        try:
            thread.run(self._stop(), timeout=self.shutdown_timeout + CONTROL_TIMEOUT)
        finally:
            thread.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
