"""A recording reverse proxy with per-request fault injection, placed in front of a registry.

::

    proxy under test --(--upstream front.url)--> Front --> real registry (or any URL)
                                                   |
                                                   +-- records every request (front.requests)
                                                   +-- applies the first matching fault rule

The Front forwards method, path+query, headers (all but Host and hop-by-hop) and bodies both ways
as streams, byte for byte: no redirect following, no decompression, ``WWW-Authenticate`` and
``Location`` untouched, ``Range``/206 passed through.

Faults (``add_fault(match, fault, times=1)``; the first rule whose ``match(req)`` is true and
that has uses left applies, one rule per request):

* applied *before* contacting upstream, to any method: ``Status`` (answer with this instead),
  ``Stall`` (sleep, then forward normally);
* applied to the *body* of a 2xx upstream answer to a non-HEAD request (a 401 challenge or a HEAD
  does not use the rule up): ``CutAfter``, ``Drip``, ``FlipByte``, ``WrongLength``, and
  ``RedirectTo`` (a 307 in place of the body, as Docker Hub does for blobs).

``RedirectTo(second_front)`` makes the *second* Front act as a CDN: the first one files a ticket
(the upstream URL plus the credentials of the original request) with the second and redirects to
``second.url/_cdn/<ticket>/<original path>``; the second serves the bytes by fetching them from
the registry itself, like a presigned URL, and sets ``second.saw_authorization`` when the client
wrongly sends its ``Authorization`` header along.

A Front runs on its own thread and event loop (see ``_loop.py``), so it works from sync and async
tests alike; the recorded data is guarded by a lock. Given an ``ssl_context`` it serves HTTPS
(``tlsca.LocalCA``), e.g. a TLS upstream before a plain registry, or a TLS CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.harness._loop import BackgroundServer

CHUNK = 64 * 1024

#: RFC 9110 §7.6.1 connection-specific headers, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

#: Response headers a CDN host passes on (no registry headers such as Docker-Content-Digest).
CDN_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag")

DOCKER_HUB_PULL_LIMIT = (
    "You have reached your pull rate limit. You may increase the limit by authenticating and "
    "upgrading: https://www.docker.com/increase-rate-limit"
)


class _HasURL(Protocol):
    @property
    def url(self) -> str: ...


@dataclass
class Req:
    """One request as the Front received it.

    ``status`` is the status the Front answered (None while in flight or if the connection died
    before headers); ``fault`` the class name of the fault applied, if any.
    """

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    status: int | None = None
    fault: str | None = None


Match = Callable[[Req], bool]


# -- matchers ------------------------------------------------------------------------------------


def _method_ok(req: Req, method: str | None) -> bool:
    return method is None or req.method == method.upper()


def blob(digest: str, method: str | None = None) -> Match:
    """Requests for ``.../blobs/<digest>`` (any repository)."""
    return lambda req: req.path.endswith(f"/blobs/{digest}") and _method_ok(req, method)


def manifest(ref: str, method: str | None = None) -> Match:
    """Requests for ``.../manifests/<ref>`` (tag or digest, any repository)."""
    return lambda req: req.path.endswith(f"/manifests/{ref}") and _method_ok(req, method)


def path_contains(text: str, method: str | None = None) -> Match:
    """Requests whose path contains *text*."""
    return lambda req: text in req.path and _method_ok(req, method)


def method_is(method: str) -> Match:
    """Requests with this HTTP method."""
    return lambda req: _method_ok(req, method)


def any_request(req: Req) -> bool:
    """Every request (e.g. ``add_fault(any_request, Status(503), times=1000)``)."""
    return True


def all_of(*matches: Match) -> Match:
    """Requests matching every one of *matches*."""
    return lambda req: all(m(req) for m in matches)


# -- faults --------------------------------------------------------------------------------------


class Fault:
    """Base of all faults. ``on_body`` faults wait for a 2xx upstream answer to a non-HEAD."""

    on_body: ClassVar[bool] = False


@dataclass(frozen=True)
class Status(Fault):
    """Answer with *code*, *headers* and *body* instead of asking upstream."""

    code: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Stall(Fault):
    """Sleep *seconds* before forwarding the request (then answer normally)."""

    seconds: float


@dataclass(frozen=True)
class CutAfter(Fault):
    """Send the real headers (real Content-Length), *n_bytes* of body, then drop the connection."""

    on_body: ClassVar[bool] = True
    n_bytes: int


@dataclass(frozen=True)
class Drip(Fault):
    """Send the body at *bytes_per_sec* (in ~20 slices a second)."""

    on_body: ClassVar[bool] = True
    bytes_per_sec: int


@dataclass(frozen=True)
class FlipByte(Fault):
    """Send the body with the byte at *offset* inverted (same length, wrong digest)."""

    on_body: ClassVar[bool] = True
    offset: int = 0


@dataclass(frozen=True)
class WrongLength(Fault):
    """Declare ``Content-Length`` = real + *delta*, send what there is, then close.

    With ``delta > 0`` the client gets a short body and an EOF; with ``delta < 0`` it gets the
    first real+delta bytes (a complete but truncated response).
    """

    on_body: ClassVar[bool] = True
    delta: int


@dataclass(frozen=True)
class RedirectTo(Fault):
    """Answer 307 to *target* (a ``Front`` acting as CDN, or a base URL + original path)."""

    on_body: ClassVar[bool] = True
    target: Front | str


def too_many_requests(retry_after: int | None = 60, *, pull_limit: bool = True) -> Status:
    """Docker Hub's 429: the pull-rate-limit body (or a bare abuse-limit one) + Retry-After."""
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    message = DOCKER_HUB_PULL_LIMIT if pull_limit else "Too Many Requests"
    body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": message}]}).encode()
    return Status(429, headers, body)


@dataclass
class FaultRule:
    """A fault with its match and remaining uses; ``applied`` counts how often it fired."""

    match: Match
    fault: Fault
    remaining: int
    applied: int = 0


@dataclass(frozen=True)
class _Ticket:
    """What a CDN-acting Front needs to serve a redirected blob: where, and with which creds."""

    url: str
    headers: CIMultiDict[str]


# -- the server ----------------------------------------------------------------------------------


class RecordingProxy(BackgroundServer):
    """A reverse proxy on 127.0.0.1 that records every request and applies fault rules: what
    ``Front`` (registries) and ``s3front.S3Front`` (object stores) share. Subclasses forward in
    ``_handle``."""

    def __init__(
        self, name: str, port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(name, port, ssl_context=ssl_context)
        self._lock = threading.Lock()
        self._requests: list[Req] = []
        self._rules: list[FaultRule] = []
        self._session: aiohttp.ClientSession | None = None

    # -- test-facing API (any thread) ------------------------------------------------------------

    @property
    def requests(self) -> list[Req]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def count(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        match: Match | None = None,
    ) -> int:
        """Number of recorded requests with this method, path substring and/or matcher."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (method is None or r.method == method.upper())
                and (path_contains is None or path_contains in r.path)
                and (match is None or match(r))
            )

    def reset(self) -> None:
        """Forget recorded requests (fault rules stay)."""
        with self._lock:
            self._requests.clear()

    def add_fault(self, match: Match, fault: Fault, times: int = 1) -> FaultRule:
        """Apply *fault* to the next *times* requests matching *match*."""
        rule = FaultRule(match, fault, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Drop all fault rules (recorded requests stay)."""
        with self._lock:
            self._rules.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    async def _on_startup(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # Send exactly the client's headers: no aiohttp defaults added on the way.
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        )

    async def _on_cleanup(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class Front(RecordingProxy):
    """Reverse proxy on 127.0.0.1 to *upstream* (a URL or anything with ``.url``); with
    *ssl_context* it serves HTTPS (whatever the upstream's scheme)."""

    def __init__(
        self, upstream: str | _HasURL, *, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__("front", port, ssl_context=ssl_context)
        #: Base URL requests are forwarded to; may be changed while running.
        self.upstream = (upstream if isinstance(upstream, str) else upstream.url).rstrip("/")
        self._tickets: dict[str, _Ticket] = {}
        self._saw_authorization = False

    @property
    def saw_authorization(self) -> bool:
        """True once any request arrived carrying an ``Authorization`` header."""
        with self._lock:
            return self._saw_authorization

    def reset(self) -> None:
        """Forget recorded requests and ``saw_authorization`` (fault rules stay)."""
        with self._lock:
            self._requests.clear()
            self._saw_authorization = False

    # -- request handling (server loop) ----------------------------------------------------------

    def _record(self, request: web.Request) -> Req:
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        req = Req(request.method, request.path, request.query_string, headers)
        with self._lock:
            self._requests.append(req)
            if "Authorization" in request.headers:
                self._saw_authorization = True
        return req

    def _candidate(self, req: Req) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining <= 0:
                    continue
                if rule.fault.on_body and req.method == "HEAD":
                    continue
                if rule.match(req):
                    return rule
        return None

    def _consume(self, rule: FaultRule, req: Req) -> bool:
        with self._lock:
            if rule.remaining <= 0:  # a concurrent request took the last use
                return False
            rule.remaining -= 1
            rule.applied += 1
        req.fault = type(rule.fault).__name__
        return True

    def _issue_ticket(self, url: str, headers: Mapping[str, str]) -> str:
        key = secrets.token_urlsafe(12)
        with self._lock:
            # The ticket stands for the blob, not for one byte range of it.
            self._tickets[key] = _Ticket(
                url, CIMultiDict((k, v) for k, v in headers.items() if k.lower() != "range")
            )
        return key

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        req = self._record(request)
        response = await self._dispatch(request, req)
        req.status = req.status or response.status
        return response

    async def _dispatch(self, request: web.Request, req: Req) -> web.StreamResponse:
        rule = self._candidate(req)
        if rule is not None and not rule.fault.on_body and self._consume(rule, req):
            if isinstance(rule.fault, Status):
                return _status_response(rule.fault, request.method)
            if isinstance(rule.fault, Stall):
                await asyncio.sleep(rule.fault.seconds)
            rule = None
        headers: Mapping[str, str]
        if request.path.startswith("/_cdn/"):
            target = self._ticket_target(request)
            if target is None:
                return web.Response(status=404, text="unknown ticket")
            url, headers = target
            cdn = True
        else:
            url = self.upstream + request.raw_path
            headers = _forward_headers(request.headers)
            cdn = False
        assert self._session is not None
        try:
            upstream = await self._session.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.Response(status=502, text=f"front: upstream unreachable: {exc!r}")
        async with upstream:
            resp_headers = _response_headers(upstream.headers, cdn=cdn)
            if rule is not None and 200 <= upstream.status < 300 and self._consume(rule, req):
                return await self._apply_body_fault(
                    rule.fault, request, req, upstream, resp_headers, url, headers
                )
            return await _relay(request, req, upstream.status, resp_headers, upstream.content)

    def _ticket_target(self, request: web.Request) -> tuple[str, CIMultiDict[str]] | None:
        _, _, rest = request.raw_path.partition("/_cdn/")
        key = rest.partition("/")[0]
        with self._lock:
            ticket = self._tickets.get(key)
        if ticket is None:
            return None
        headers = CIMultiDict(ticket.headers)
        if "Range" in request.headers:
            headers["Range"] = request.headers["Range"]
        return ticket.url, headers

    async def _apply_body_fault(
        self,
        fault: Fault,
        request: web.Request,
        req: Req,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        url: str,
        upstream_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        body = upstream.content
        if isinstance(fault, RedirectTo):
            if isinstance(fault.target, Front):
                key = fault.target._issue_ticket(url, upstream_headers)
                location = f"{fault.target.url}/_cdn/{key}{request.raw_path}"
            else:
                location = fault.target.rstrip("/") + request.raw_path
            req.status = 307
            return web.Response(status=307, headers={"Location": location})
        if isinstance(fault, FlipByte):
            return await _relay(request, req, upstream.status, headers, _flip(body, fault.offset))
        if isinstance(fault, Drip):
            return await _relay(request, req, upstream.status, headers, _drip(body, fault))
        if isinstance(fault, CutAfter):
            return await _relay(
                request, req, upstream.status, headers, _limit(body, fault.n_bytes), abort=True
            )
        if isinstance(fault, WrongLength):
            data = await body.read()
            headers["Content-Length"] = str(max(0, len(data) + fault.delta))
            return await _relay(request, req, upstream.status, headers, _once(data), abort=True)
        raise TypeError(f"unknown body fault {fault!r}")


# -- helpers -------------------------------------------------------------------------------------


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}


def _forward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | {"host"} | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _response_headers(headers: CIMultiDictProxy[str], *, cdn: bool) -> CIMultiDict[str]:
    if cdn:
        return CIMultiDict((k, headers[k]) for k in CDN_HEADERS if k in headers)
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _status_response(fault: Status, method: str) -> web.Response:
    headers = CIMultiDict(fault.headers)
    if fault.body and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"
    body = b"" if method == "HEAD" else fault.body
    if method == "HEAD":
        headers["Content-Length"] = str(len(fault.body))
    return web.Response(status=fault.code, headers=headers, body=body or None)


async def _relay(
    request: web.Request,
    req: Req,
    status: int,
    headers: CIMultiDict[str],
    chunks: aiohttp.StreamReader | AsyncIterator[bytes],
    *,
    abort: bool = False,
) -> web.StreamResponse:
    """Stream *chunks* to the client; with *abort*, close the connection instead of finishing.

    If upstream fails mid-body the client connection is dropped too (the only honest signal once
    headers are out); if the client leaves, the prepared response is returned and aiohttp quietly
    gives up on it.
    """
    response = web.StreamResponse(status=status, headers=headers)
    req.status = status  # before any byte leaves: the client may look at the record at once
    try:
        await response.prepare(request)
        if request.method != "HEAD":
            source = (
                chunks.iter_chunked(CHUNK) if isinstance(chunks, aiohttp.StreamReader) else chunks
            )
            async for chunk in source:
                await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError):
        abort = True
    except ConnectionError:
        return response
    if abort:
        _abort(request)
        return response
    await response.write_eof()
    return response


def _abort(request: web.Request) -> None:
    """Close the client connection after flushing what was written (a mid-body disconnect)."""
    protocol: Any = request.protocol
    with contextlib.suppress(Exception):
        protocol.force_close()
    if request.transport is not None:
        request.transport.close()


async def _limit(body: aiohttp.StreamReader, n_bytes: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in body.iter_chunked(CHUNK):
        take = chunk[: n_bytes - sent]
        if take:
            yield take
            sent += len(take)
        if sent >= n_bytes:
            return


async def _flip(body: aiohttp.StreamReader, offset: int) -> AsyncIterator[bytes]:
    position = 0
    async for chunk in body.iter_chunked(CHUNK):
        if position <= offset < position + len(chunk):
            mutable = bytearray(chunk)
            mutable[offset - position] ^= 0xFF
            chunk = bytes(mutable)
        position += len(chunk)
        yield chunk


async def _drip(body: aiohttp.StreamReader, fault: Drip) -> AsyncIterator[bytes]:
    """Slices of ~1/20 s of the rate, each sent once the clock says the rate allows it (the
    rate holds above CHUNK * 20 bytes a second too)."""
    loop = asyncio.get_running_loop()
    step = max(1, int(fault.bytes_per_sec * 0.05))
    started, sent = loop.time(), 0
    async for chunk in body.iter_chunked(CHUNK):
        for start in range(0, len(chunk), step):
            piece = chunk[start : start + step]
            yield piece
            sent += len(piece)
            ahead = started + sent / fault.bytes_per_sec - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
