"""Debian's headless Chromium, driven over the DevTools protocol (a websocket, via aiohttp).

::

    async with Browser(tmp_dir) as browser:
        await browser.open(url, width=1280, height=800)
        title = await browser.eval("document.title")
        await browser.screenshot(tmp_dir / "page.png")

One browser process and one page per ``Browser``; the process listens on 127.0.0.1 only
(``--remote-debugging-port=0``: the port is read back from ``DevToolsActivePort``), has its
own throw-away profile, and is killed on exit. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import aiohttp

from tests.harness.tools import require_tool, track_process, untrack_process

START_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """A DevTools call failed, or the page threw."""


class Browser:
    def __init__(self, directory: Path) -> None:
        self.binary = require_tool("chromium")
        self.directory = directory
        self.profile = directory / "chromium-profile"
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self.console_errors: list[str] = []

    def _launch(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "chromium.log", "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        track_process(self._proc)

    async def __aenter__(self) -> Self:
        self._launch()
        try:
            await self._connect()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _connect(self) -> None:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.is_file() or not port_file.read_text().strip():
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        page = None
        while page is None:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                if time.monotonic() > deadline:
                    raise BrowserError("chromium has no page target")
                await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Runtime.enable")

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            untrack_process(proc)
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are noted (console errors)."""
        assert self._ws is not None
        ident = next(self._ids)
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(CALL_TIMEOUT):
            while True:
                msg = await self._ws.receive_json()
                if msg.get("method") == "Runtime.exceptionThrown":
                    details = msg["params"]["exceptionDetails"]
                    self.console_errors.append(str(details.get("exception", details)))
                elif (
                    msg.get("method") == "Runtime.consoleAPICalled"
                    and msg["params"].get("type") == "error"
                ):
                    self.console_errors.append(str(msg["params"].get("args")))
                if msg.get("id") != ident:
                    continue
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    async def eval(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited) and return its JSON value."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"page threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(
        self,
        url: str,
        *,
        width: int = 1280,
        height: int = 800,
        mobile: bool = False,
        headers: dict[str, str] | None = None,
        ready: str = "document.readyState === 'complete'",
        within: float = 30.0,
    ) -> None:
        """Size the viewport, load ``url`` and wait (bounded) until ``ready`` is true."""
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        await self.call("Network.enable")
        await self.call("Network.setExtraHTTPHeaders", headers=headers or {})
        await self.eval("window.__leaving = true")  # gone once the new document is in
        await self.call("Page.navigate", url=url)
        await self.wait_for(f"!window.__leaving && document.body && ({ready})", within)

    async def wait_for(self, condition: str, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while not await self.eval(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {condition}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = await self.eval(
                "({w: document.documentElement.scrollWidth,"
                " h: document.documentElement.scrollHeight})"
            )
            params["clip"] = {"x": 0, "y": 0, "width": size["w"], "height": size["h"], "scale": 1}
        data = (await self.call("Page.captureScreenshot", **params))["data"]
        await asyncio.to_thread(path.write_bytes, base64.b64decode(data))
        return path
