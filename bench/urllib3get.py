"""The threaded blob GET of :mod:`proxy.fetch.threadget`, made with urllib3 instead of by hand:
the alternative that ``bench/plumbing.py`` measured against it (issue #20), kept here so that the
figures in ``threadget``'s docstring can be measured again.

``python -m bench.urllib3get serve ...`` is ``regproxy serve ...`` with this module in the place
of ``threadget`` for blob GETs. Same interface (:func:`get_async`, :func:`get`, a
:class:`Response` with ``status``, ``headers``, ``buffered``, ``statuses``, ``error_body``,
``release``; :class:`BodySource` for :class:`proxy.fetch.rawbody.BodyCopy`; ``POOL.close()``);
``tests/test_cold_path.py`` passed with it. urllib3 2.x does the connection pooling (keep-alive,
``POOL_PER_ORIGIN`` per origin), TLS (the same context as aiohttp's and threadget's) and the
HTTP/1.1 framing; the redirects are followed here, one hop at a time, so that ``Authorization``
goes to ``auth_origin`` only and each hop goes through the proxy the environment names for it
(a ``ProxyManager`` per proxy). The body is read with ``preload_content=False,
decode_content=False`` by ``HTTPResponse.readinto`` into the copy's buffer, blocking (the socket's
timeout is ``read_timeout``).

With ``REGPROXY_THREADGET=urllib3-fp`` it reads the body with ``http.client``'s ``readinto``
(urllib3's ``HTTPResponse._fp``, private) instead: urllib3 2.x's ``readinto`` is
``read(len(b))`` copied into ``b``, and ``http.client``'s ``read(n)`` copies once more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import urllib3
from multidict import CIMultiDict
from urllib3.exceptions import HTTPError, ReadTimeoutError
from urllib3.exceptions import SSLError as Urllib3SSLError

from proxy.fetch.threadget import (
    MAX_REDIRECTS,
    POOL_PER_ORIGIN,
    REDIRECTS,
    SMALL_BODY,
    Origin,
    env_proxy,
    origin_of,
    ssl_context,
)

__all__ = ["MAX_REDIRECTS", "REDIRECTS", "env_proxy", "get", "get_async", "origin_of"]

#: Read the body through http.client's readinto (one copy fewer each way; private attribute).
DIRECT = os.environ.get("REGPROXY_THREADGET", "") == "urllib3-fp"


class Managers:
    """One PoolManager for direct connections, one ProxyManager per proxy URL (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._direct: urllib3.PoolManager | None = None
        self._proxies: dict[str, urllib3.ProxyManager] = {}

    def _kwargs(self) -> dict[str, Any]:
        return {"maxsize": POOL_PER_ORIGIN, "block": False, "ssl_context": ssl_context()}

    def for_url(self, url: str) -> urllib3.PoolManager:
        proxy = env_proxy(url)
        with self._lock:
            if proxy is None:
                if self._direct is None:
                    self._direct = urllib3.PoolManager(num_pools=64, **self._kwargs())
                return self._direct
            manager = self._proxies.get(proxy)
            if manager is None:
                manager = self._proxies[proxy] = urllib3.ProxyManager(proxy, **self._kwargs())
            return manager

    def close(self) -> None:
        with self._lock:
            managers = [self._direct, *self._proxies.values()]
            self._direct, self._proxies = None, {}
        for manager in managers:
            if manager is not None:
                manager.clear()


POOL = Managers()
#: Once more when a kept connection turns out closed; statuses (429 with Retry-After too) and
#: redirects are the caller's.
_RETRY = urllib3.Retry(
    total=1, connect=0, read=1, redirect=0, status=0, respect_retry_after_header=False
)
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(
    max_workers=32, thread_name_prefix="regproxy-urllib3"
)


class _Conn:
    """What callers of ``resp.conn`` use: ``close()`` and ``fileno()``."""

    def __init__(self, raw: urllib3.BaseHTTPResponse) -> None:
        self.raw = raw

    def close(self) -> None:
        self.raw.close()
        self.raw.release_conn()  # a closed connection: the pool opens a new one in its place

    def fileno(self) -> int:
        return self.raw.fileno()


@dataclass
class Response:
    status: int
    headers: CIMultiDict[str]
    url: str
    conn: _Conn
    buffered: bytes = b""
    statuses: list[int] = field(default_factory=list)
    error_body: bytes | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    @property
    def plain_body(self) -> bool:
        return (
            self.content_length is not None
            and not self.headers.get("Transfer-Encoding")
            and self.headers.get("Content-Encoding", "identity").lower() == "identity"
        )

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("Connection", "").lower()

    def release(self, complete: bool) -> None:
        if complete and self.keep_alive:
            self.conn.raw.release_conn()
        else:
            self.conn.close()


class BodySource:
    """The body as a ``proxy.fetch.rawbody.Source``; :meth:`readinto` blocks (up to the read
    timeout) rather than raising BlockingIOError."""

    def __init__(self, resp: Response) -> None:
        self.resp = resp
        raw = resp.conn.raw
        fp = getattr(raw, "_fp", None) if DIRECT else None
        self._readinto = fp.readinto if fp is not None else raw.readinto

    def fileno(self) -> int:
        return self.resp.conn.fileno()

    def readinto(self, view: memoryview) -> int:
        try:
            return int(self._readinto(view))
        except ReadTimeoutError as exc:
            raise TimeoutError("no bytes from upstream") from exc
        except HTTPError as exc:  # ProtocolError, IncompleteRead: cut short
            raise ConnectionResetError(str(exc)) from exc
        except ValueError:  # read from a closed file: the connection went away
            return 0

    def finish(self, complete: bool) -> None:
        self.resp.release(complete)


async def get_async(url: str, headers: dict[str, str], **kwargs: Any) -> Response:
    future = _EXECUTOR.submit(get, url, headers, **kwargs)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_late)
        raise


def _close_late(future: concurrent.futures.Future[Response]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().conn.close()


def get(
    url: str,
    headers: dict[str, str],
    *,
    auth_origin: Origin,
    connect_timeout: float,
    read_timeout: float,
    user_agent: str,
) -> Response:
    """GET ``url`` following redirects (blocking); raises OSError/ValueError as threadget."""
    timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
    statuses: list[int] = []
    for _ in range(MAX_REDIRECTS + 1):
        origin = origin_of(url)
        sent = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
        sent.update(
            headers
            if origin == auth_origin
            else {k: v for k, v in headers.items() if k.lower() != "authorization"}
        )
        try:
            raw = POOL.for_url(url).urlopen(
                "GET",
                url,
                headers=sent,
                redirect=False,
                retries=_RETRY,
                timeout=timeout,
                preload_content=False,
                decode_content=False,
            )
        except Urllib3SSLError as exc:
            cause = exc.__context__ or (exc.args[0] if exc.args else None)
            raise cause if isinstance(cause, ssl.SSLError) else OSError(str(exc)) from exc
        except HTTPError as exc:  # MaxRetryError, ProtocolError, timeouts
            reason = getattr(exc, "reason", None)
            if isinstance(reason, Urllib3SSLError) and isinstance(reason.__context__, ssl.SSLError):
                raise reason.__context__ from exc
            raise OSError(str(exc)) from exc
        resp = Response(
            raw.status, CIMultiDict(raw.headers.items()), url, _Conn(raw), statuses=statuses
        )
        statuses.append(raw.status)
        location = resp.headers.get("Location")
        if resp.status in REDIRECTS and location:
            _read_small(resp)
            url = urljoin(url, location)
            continue
        if resp.status not in (200, 206):
            resp.error_body = _read_small(resp)
        return resp
    raise ValueError("too many redirects")


def _read_small(resp: Response) -> bytes | None:
    length = resp.content_length
    if length is None or length > SMALL_BODY or not resp.plain_body:
        resp.conn.close()
        return None
    try:
        body = resp.conn.raw.read()  # to the end (read(0) would leave http.client unfinished)
    except (OSError, HTTPError):
        resp.conn.close()
        return None
    resp.release(len(body) == length)
    return body


def serve() -> int:
    """``regproxy`` with this module making the threaded blob GETs."""
    from proxy.cli import main
    from proxy.fetch import downloads, spool

    current = sys.modules[__name__]
    downloads.threadget = current  # type: ignore[attr-defined]
    spool.threadget = current  # type: ignore[attr-defined]
    return main()


if __name__ == "__main__":
    sys.exit(serve())
