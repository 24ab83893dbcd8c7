"""A recording fault front for the object store: an aiohttp reverse proxy before the S3 port.

::

    proxy under test --(AWS_ENDPOINT_URL=front.url)--> S3Front --> SeaweedS3 (weed mini)
                                                          |
                                                          +-- records every request
                                                          +-- applies the first matching fault rule

It is ``front.Front``'s sibling for S3 and reuses its vocabulary: ``Req`` records, the matchers
(``method_is``, ``path_contains``, ``all_of``, ``any_request``), ``FaultRule`` and the faults

* ``Status(code, headers, body)``: answer this instead of forwarding (``s3_error()`` builds the
  XML error an object store sends, e.g. ``s3_error(500)``, ``s3_error(503, "SlowDown")``);
* ``Stall(seconds)``: sleep, then forward (a slow object store);
* ``Drop()``: close the connection without any answer, request body unread (a store that died);
* ``DropAfterBody(n)``: read *n* bytes of the request body, then close without an answer (the
  store dying in the middle of an upload part);
* ``CutAfter(n)``: on a 2xx answer to a GET, send the real headers and *n* body bytes, then close.

S3 signatures (SigV4) cover the ``Host`` header, so unlike ``Front`` this one forwards the
client's ``Host`` unchanged: the store verifies the signature the client made for the front.
``Expect: 100-continue`` is answered by the front itself (aiohttp does) and not forwarded.

Matchers for the S3 calls a multipart upload is made of: ``create_upload()`` (POST ``?uploads``),
``upload_part()`` (PUT ``?partNumber=…&uploadId=…``), ``complete_upload()`` (POST ``?uploadId=…``),
``abort_upload()`` (DELETE ``?uploadId=…``), ``get_object()``/``put_object()`` (whole objects).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.harness.front import (
    CHUNK,
    HOP_BY_HOP,
    CutAfter,
    Fault,
    FaultRule,
    RecordingProxy,
    Req,
    Stall,
    Status,
    _abort,
    _connection_tokens,
    _limit,
    _relay,
    _response_headers,
    _status_response,
)

__all__ = [
    "CutAfter",
    "Drop",
    "DropAfterBody",
    "S3Front",
    "Stall",
    "Status",
    "abort_upload",
    "complete_upload",
    "create_upload",
    "get_object",
    "put_object",
    "s3_error",
    "upload_part",
]


@dataclass(frozen=True)
class Drop(Fault):
    """Close the client connection at once: no status line, request body left unread."""


@dataclass(frozen=True)
class DropAfterBody(Fault):
    """Read *n_bytes* of the request body (all of it if shorter), then close: no answer."""

    n_bytes: int


def s3_error(code: int = 500, name: str | None = None, message: str = "injected fault") -> Status:
    """A ``Status`` fault with an S3-style XML error body."""
    name = name or {500: "InternalError", 503: "SlowDown", 403: "AccessDenied"}.get(code, "Error")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{name}</Code><Message>{message}</Message></Error>"
    ).encode()
    return Status(code, {"Content-Type": "application/xml"}, body)


# -- matchers for S3 operations ----------------------------------------------------------------


def _query(req: Req) -> dict[str, list[str]]:
    return parse_qs(req.query, keep_blank_values=True)


def create_upload(req: Req) -> bool:
    """``CreateMultipartUpload``: ``POST /bucket/key?uploads``."""
    return req.method == "POST" and "uploads" in _query(req)


def upload_part(req: Req) -> bool:
    """``UploadPart``: ``PUT /bucket/key?partNumber=N&uploadId=…``."""
    q = _query(req)
    return req.method == "PUT" and "partNumber" in q and "uploadId" in q


def complete_upload(req: Req) -> bool:
    """``CompleteMultipartUpload``: ``POST /bucket/key?uploadId=…``."""
    return req.method == "POST" and "uploadId" in _query(req)


def abort_upload(req: Req) -> bool:
    """``AbortMultipartUpload``: ``DELETE /bucket/key?uploadId=…``."""
    return req.method == "DELETE" and "uploadId" in _query(req)


def get_object(req: Req) -> bool:
    """``GetObject`` of a key (a GET on ``/bucket/key`` without a listing query)."""
    q = _query(req)
    return req.method == "GET" and req.path.count("/") >= 2 and "list-type" not in q


def put_object(req: Req) -> bool:
    """``PutObject`` (a PUT that is not an upload part)."""
    return req.method == "PUT" and "uploadId" not in _query(req)


# -- the server --------------------------------------------------------------------------------


class S3Front(RecordingProxy):
    """Reverse proxy on 127.0.0.1 to an S3 *endpoint* URL, with fault rules and request counts."""

    def __init__(
        self, endpoint: str, *, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__("s3front", port, ssl_context=ssl_context)
        self.endpoint = endpoint.rstrip("/")

    def counts_by_method(self) -> dict[str, int]:
        """``{"GET": n, "PUT": n, …}`` over every recorded request."""
        counts: dict[str, int] = {}
        with self._lock:
            for r in self._requests:
                counts[r.method] = counts.get(r.method, 0) + 1
        return counts

    # -- request handling (server loop) ----------------------------------------------------------

    def _take_rule(self, req: Req) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining <= 0 or not rule.match(req):
                    continue
                if rule.fault.on_body and req.method != "GET":
                    continue
                rule.remaining -= 1
                rule.applied += 1
                req.fault = type(rule.fault).__name__
                return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        req = Req(request.method, request.path, request.query_string, headers)
        with self._lock:
            self._requests.append(req)
        rule = self._take_rule(req)
        fault = rule.fault if rule is not None else None
        if isinstance(fault, Status):
            req.status = fault.code
            return _status_response(fault, request.method)
        if isinstance(fault, DropAfterBody):
            received = 0
            while received < fault.n_bytes:
                chunk = await request.content.read(min(CHUNK, fault.n_bytes - received))
                if not chunk:
                    break
                received += len(chunk)
        if isinstance(fault, Drop | DropAfterBody):
            _abort(request)
            return web.Response(status=500)  # never sent: the transport is closed
        if isinstance(fault, Stall):
            await asyncio.sleep(fault.seconds)
        return await self._forward(request, req, fault if isinstance(fault, CutAfter) else None)

    async def _forward(
        self, request: web.Request, req: Req, cut: CutAfter | None
    ) -> web.StreamResponse:
        drop = HOP_BY_HOP | {"expect"} | _connection_tokens(request.headers)
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in drop
        )
        assert self._session is not None
        try:
            upstream = await self._session.request(
                request.method,
                URL(self.endpoint + request.raw_path, encoded=True),
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            req.status = 502
            return web.Response(status=502, text=f"s3front: store unreachable: {exc!r}")
        async with upstream:
            resp_headers = _response_headers(upstream.headers, cdn=False)
            body: Any = upstream.content
            if cut is not None and 200 <= upstream.status < 300:
                return await _relay(
                    request,
                    req,
                    upstream.status,
                    resp_headers,
                    _limit(body, cut.n_bytes),
                    abort=True,
                )
            return await _relay(request, req, upstream.status, resp_headers, body)
