"""A blob GET on a connection that a worker thread owns, so that its body never crosses the loop.

Through aiohttp the event loop handles every byte of a cold blob: it parses the body into new
``bytes`` objects, queues them and wakes the download task for each; over TLS, uvloop's SSL reads
the socket into a memory BIO and decrypts on the loop too (on the benchmark's 2 cores that left
regproxy at 0.8x distribution's cold throughput from a TLS upstream). Here a worker thread makes
the request itself, over ``ssl.SSLObject`` and memory BIOs for HTTPS: it reads the socket 1 MiB
at a time and decrypts straight into the download's buffers (OpenSSL releases the GIL), and
:class:`proxy.fetch.rawbody.BodyCopy` appends, hashes and counts.

What it does is the plain path: redirects followed (``Authorization`` goes to the upstream's own
origin only, as in :mod:`proxy.fetch.upstream`), a body of announced length with no transfer or
content coding, and error answers read when small, over a direct connection: a URL the
environment sends through a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``: :func:`env_proxy`)
raises :class:`ProxyRequired`, and the caller asks through aiohttp, which
:mod:`proxy.fetch.upstream` points at that proxy. The caller (``proxy.fetch.downloads``) takes up
a ``401`` through :meth:`proxy.fetch.upstream.Upstream.authorize` and raises a ``404`` or ``429``
through :meth:`proxy.fetch.upstream.Upstream.raise_for`; what needs more (a ``5xx`` to retry with
back-off, chunked framing, a failure to connect) is asked again through
:meth:`proxy.fetch.upstream.Upstream.request`. Connections whose body was read to its end are kept
for the next blob from the same origin (Docker Hub sends every blob to one CDN host), at most
``POOL_PER_ORIGIN`` each for ``POOL_IDLE`` seconds.

Why by hand rather than urllib3 (issue #20: switch if urllib3 came within 5 % in throughput and
CPU per GB). urllib3 2.7 behind this interface (``bench/urllib3get.py``: its pools, keep-alive,
TLS, ``ProxyManager`` per environment proxy, ``HTTPResponse.readinto`` with
``preload_content=False, decode_content=False``) was measured against this module by
``bench/plumbing.py``: fresh regproxies alternating, ``curl`` fetching one or four cold blobs of 64
and 256 MiB, six samples each. regproxy's CPU per GB with urllib3 was 1.06-1.13x this module's
from a plain-HTTP upstream and 1.00-1.27x from a TLS one, beyond 5 % in 7 of the 8 scenarios
(throughput medians 0.74-1.16x, within the noise of the shared 2-core machine); the two clients
alone (GET and read 256 MiB, no hashing, no disk) cost 1.08x plain and 1.47x over TLS. Where it
goes: urllib3's ``readinto`` is ``read(len(b))`` copied into ``b``, and ``http.client``'s
``read(n)`` allocates a new 1 MiB buffer and copies once more; over TLS every read goes down
through ``io.BufferedReader``, ``socket.SocketIO`` and ``ssl.SSLSocket`` (reading with
``http.client``'s own ``readinto``, without urllib3's copies, still cost 1.36x), where this module
reads 1 MiB of ciphertext per ``readv`` and decrypts it into the caller's buffer. Figures:
bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import io
import os
import select
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

from multidict import CIMultiDict

MiB = 1024 * 1024
#: Raw (encrypted) bytes read from the socket at once.
RAW_READ = MiB
#: The response head must fit in this.
MAX_HEAD = 64 * 1024
MAX_REDIRECTS = 5
POOL_PER_ORIGIN = 8
POOL_IDLE = 30.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Redirect and error bodies up to this size are read (keeping the connection); larger ones
#: close it.
SMALL_BODY = 64 * 1024

_context: ssl.SSLContext | None = None
_context_lock = threading.Lock()


def ssl_context() -> ssl.SSLContext:
    """The client context: the system's trust store (``SSL_CERT_FILE`` honoured), as aiohttp's."""
    global _context
    with _context_lock:
        if _context is None:
            _context = ssl.create_default_context()
        return _context


Origin = tuple[str, str, int]  # scheme, host, port


class ProxyRequired(ValueError):
    """The environment sends this URL through a proxy, which this module does not speak."""


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``: ``HTTP_PROXY`` or ``HTTPS_PROXY`` by its
    scheme (upper or lower case), unless ``NO_PROXY`` names its host (curl's and Go's rule)."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme.lower())
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def origin_of(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"cannot fetch {scheme or 'a relative'} URL")
    return scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80)


class Connection:
    """One HTTP/1.1 connection (TLS through memory BIOs), used by one thread at a time.

    The socket is non-blocking throughout: :meth:`readinto` raises :class:`BlockingIOError` when
    nothing can be read now (the caller polls :meth:`fileno`), and returns 0 at the end of the
    stream.
    """

    def __init__(self, origin: Origin, sock: socket.socket) -> None:
        self.origin = origin
        self.sock = sock
        self.tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._raw = memoryview(bytearray(RAW_READ if origin[0] == "https" else 0))
        self.idle_since = 0.0

    @classmethod
    def open(cls, origin: Origin, timeout: float) -> Connection:
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = cls(origin, sock)
            if scheme == "https":
                conn.tls = ssl_context().wrap_bio(
                    conn._incoming, conn._outgoing, server_hostname=host
                )
                conn._handshake(time.monotonic() + timeout)
            return conn
        except BaseException:
            sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _wait(self, events: int, deadline: float) -> None:
        left = deadline - time.monotonic()
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if left <= 0 or not poller.poll(left * 1000):
            raise TimeoutError("no answer from upstream")

    def _handshake(self, deadline: float) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
                self._flush(deadline)
                return
            except ssl.SSLWantReadError:
                self._flush(deadline)
                self._fill(deadline)

    def _flush(self, deadline: float) -> None:
        """Send what TLS queued in the outgoing BIO."""
        data = memoryview(self._outgoing.read()) if self.tls is not None else memoryview(b"")
        self._send_raw(data, deadline)

    def _send_raw(self, data: memoryview, deadline: float) -> None:
        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline)
                continue
            data = data[sent:]

    def _fill(self, deadline: float) -> None:
        """Feed the incoming BIO with what the socket has (waiting until ``deadline``)."""
        while True:
            try:
                n = os.readv(self.sock.fileno(), [self._raw])
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)
                continue
            if n == 0:
                raise ConnectionResetError("upstream closed the connection")
            self._incoming.write(self._raw[:n])
            return

    def send(self, data: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.tls is None:
            self._send_raw(memoryview(data), deadline)
            return
        self.tls.write(data)
        self._flush(deadline)

    def readinto(self, view: memoryview) -> int:
        """Read up to ``len(view)`` body bytes now; BlockingIOError if none can be, 0 at EOF."""
        if self.tls is None:
            return os.readv(self.sock.fileno(), [view])
        while True:
            try:
                # with a buffer, read() returns the count (typeshed says bytes)
                return cast(int, self.tls.read(len(view), view))
            except ssl.SSLWantReadError:
                n = os.readv(self.sock.fileno(), [self._raw])  # BlockingIOError: poll, retry
                if n == 0:
                    return 0
                self._incoming.write(self._raw[:n])
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    def read_some(self, size: int, timeout: float) -> bytes:
        """Up to ``size`` bytes, waiting up to ``timeout`` for the first; b"" at EOF."""
        deadline = time.monotonic() + timeout
        buf = memoryview(bytearray(size))
        while True:
            try:
                n = self.readinto(buf)
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)
                continue
            return bytes(buf[:n])

    def stale(self) -> bool:
        """A kept connection that the server closed (or sent something unasked) meanwhile."""
        if self.tls is not None and (self._incoming.pending or self.tls.pending()):
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))


@dataclass
class Response:
    """A response head, on the connection whose body follows."""

    status: int
    headers: CIMultiDict[str]
    url: str
    conn: Connection
    #: Body bytes that arrived with the head.
    buffered: bytes
    #: Statuses of every response on the way here (redirects included), for the metrics.
    statuses: list[int] = field(default_factory=list)
    #: The body of an error answer (not 200/206) when small; its connection is then kept.
    error_body: bytes | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    @property
    def plain_body(self) -> bool:
        """A body of announced length with no coding: bytes to append as they come."""
        return (
            self.content_length is not None
            and not self.headers.get("Transfer-Encoding")
            and self.headers.get("Content-Encoding", "identity").lower() == "identity"
        )

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("Connection", "").lower()

    def release(self, complete: bool) -> None:
        """Done with the connection: kept for the next GET when the body was read exactly to
        its end (``complete``) and the server keeps it open, closed otherwise."""
        if complete and self.keep_alive:
            POOL.give(self.conn)
        else:
            self.conn.close()


class BodySource:
    """The body of a :class:`Response` as a ``proxy.fetch.rawbody.Source``: its connection is kept
    for the next GET when the body was read exactly to its end."""

    def __init__(self, resp: Response) -> None:
        self.resp = resp

    def fileno(self) -> int:
        return self.resp.conn.fileno()

    def readinto(self, view: memoryview) -> int:
        return self.resp.conn.readinto(view)

    def finish(self, complete: bool) -> None:
        self.resp.release(complete)


class Pool:
    """Kept connections by origin (any thread)."""

    def __init__(self) -> None:
        self._idle: dict[Origin, list[Connection]] = {}
        self._lock = threading.Lock()

    def take(self, origin: Origin) -> Connection | None:
        while True:
            with self._lock:
                kept = self._idle.get(origin)
                if not kept:
                    return None
                conn = kept.pop()
            if time.monotonic() - conn.idle_since < POOL_IDLE and not conn.stale():
                return conn
            conn.close()

    def give(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            kept = self._idle.setdefault(conn.origin, [])
            if len(kept) < POOL_PER_ORIGIN:
                kept.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for kept in idle.values():
            for conn in kept:
                conn.close()


POOL = Pool()
#: The threads that connect, send and read heads (apart from the copying ones, and from the
#: loop's default executor, whose few threads fsync and read files).
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="regproxy-get")


async def get_async(url: str, headers: dict[str, str], **kwargs: Any) -> Response:
    """:func:`get` in a worker thread; a response that arrives after the caller was cancelled is
    closed."""
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
    """GET ``url`` following redirects (blocking; in a worker thread).

    Returns the first response that is not a redirect; its connection is the caller's to read
    and then to :meth:`Pool.give` back or close. Raises OSError/ssl.SSLError/TimeoutError/
    ValueError when no answer could be had.
    """
    statuses: list[int] = []
    for _ in range(MAX_REDIRECTS + 1):
        origin = origin_of(url)
        if env_proxy(url) is not None:  # a redirect to a host behind the proxy
            raise ProxyRequired(f"{origin[1]} is reached through a proxy")
        sent = (
            headers
            if origin == auth_origin
            else {k: v for k, v in headers.items() if k.lower() != "authorization"}
        )
        resp = _request(url, origin, sent, connect_timeout, read_timeout, user_agent)
        resp.statuses = [*statuses, resp.status]
        statuses = resp.statuses
        location = resp.headers.get("Location")
        if resp.status in REDIRECTS and location:
            _read_small(resp, read_timeout)
            url = urljoin(url, location)
            continue
        if resp.status not in (200, 206):
            resp.error_body = _read_small(resp, read_timeout)
        return resp
    raise ValueError("too many redirects")


def _request(
    url: str,
    origin: Origin,
    headers: dict[str, str],
    connect_timeout: float,
    read_timeout: float,
    user_agent: str,
) -> Response:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    scheme, host, port = origin
    name = f"[{host}]" if ":" in host else host
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {name if port == (443 if scheme == 'https' else 80) else f'{name}:{port}'}",
        f"User-Agent: {user_agent}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if not any(k.lower() == "accept-encoding" for k in headers):
        lines.append("Accept-Encoding: identity")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    kept = POOL.take(origin)
    if kept is not None:
        try:
            return _exchange(kept, url, request, read_timeout)
        except (OSError, ssl.SSLError):
            kept.close()  # closed by the server while we sent: once more on a new one
    conn = Connection.open(origin, connect_timeout)
    try:
        return _exchange(conn, url, request, read_timeout)
    except BaseException:
        conn.close()
        raise


def _exchange(conn: Connection, url: str, request: bytes, read_timeout: float) -> Response:
    conn.send(request, read_timeout)
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_HEAD:
            raise ValueError("response head too large")
        chunk = conn.read_some(MAX_HEAD, read_timeout)
        if not chunk:
            raise ConnectionResetError("upstream closed the connection before answering")
        head += chunk
    head, _, buffered = head.partition(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    version, _, tail = status_line.decode("latin-1").partition(" ")
    code = tail[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x response: {status_line[:40]!r}")
    headers = CIMultiDict(http.client.parse_headers(io.BytesIO(rest + b"\r\n\r\n")).items())
    return Response(int(code), headers, url, conn, buffered)


def _read_small(resp: Response, read_timeout: float) -> bytes | None:
    """Read a small body (a redirect's, an error's) and keep the connection; None, and the
    connection closed, when it is large, framed otherwise, or cut."""
    length = resp.content_length
    if length is None or length > SMALL_BODY or not resp.plain_body:
        resp.conn.close()
        return None
    body = resp.buffered
    try:
        while len(body) < length:
            chunk = resp.conn.read_some(length - len(body), read_timeout)
            if not chunk:
                raise ConnectionResetError("cut")
            body += chunk
    except (OSError, ssl.SSLError):
        resp.conn.close()
        return None
    resp.release(len(body) == length)
    return body[:length]
