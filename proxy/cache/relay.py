"""The uncached relay: a blob sent straight from upstream, verified, when the cache cannot take it.

Used when the store fails (disk full, object store away) before or during a download: the client
still gets the blob. The bytes a client already got from the failed download are re-hashed from
its spool file, the rest comes from upstream with ``Range``, and the last chunk is held back until
the digest matches — otherwise the connection is cut short of ``Content-Length``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os

import aiohttp
from aiohttp import web

from proxy.core.errors import BlobUnknown, UpstreamError, to_registry_error
from proxy.fetch.download import CACHE_RESULT, CHUNK, Cache
from proxy.fetch.upstream import Upstream

log = logging.getLogger(__name__)


def miss_response(digest: str, size: int | None, cache: Cache = Cache.MISS) -> web.StreamResponse:
    """Headers of a blob answered while it is fetched (no body yet)."""
    resp = web.StreamResponse(
        headers={
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "X-Cache": cache.header,
        }
    )
    if size is not None:
        resp.content_length = size
    return resp


def abort(request: web.Request) -> None:
    """Cut the client's connection so a short body can never pass for a whole one."""
    request[CACHE_RESULT] = Cache.ABORTED
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()


async def relay_uncached(
    request: web.Request,
    resp: web.StreamResponse | None,
    upstream: Upstream,
    repository: str,
    digest: str,
    fd: int | None,
    offset: int,
) -> web.StreamResponse:
    """Send a blob (from ``offset`` on) straight from upstream, verified but not cached."""
    hasher = hashlib.new(digest.partition(":")[0])
    pos = 0
    while fd is not None and pos < offset:
        chunk = os.pread(fd, min(CHUNK, offset - pos), pos)
        if not chunk:
            break
        hasher.update(chunk)
        pos += len(chunk)
    if pos != offset:
        abort(request)
        return resp or web.StreamResponse()
    log.warning("cache cannot store blob, relaying it uncached digest=%s offset=%d", digest, offset)
    request[CACHE_RESULT] = Cache.UNCACHED
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        async with upstream.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            scope=f"repository:{repository}:pull",
            headers=headers,
            expect=(200, 206),
        ) as up:
            if resp is None:
                resp = miss_response(digest, up.content_length, Cache.UNCACHED)
                await resp.prepare(request)
            skip = offset if up.status == 200 else 0
            # The latest chunk is held back (not joined to the next: no copy), so the last byte
            # goes out only once the digest matched.
            held = b""
            async for chunk in up.content.iter_chunked(CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if not chunk:
                    continue
                hasher.update(chunk)
                if held:
                    await resp.write(held)
                held = chunk
    except (TimeoutError, UpstreamError, aiohttp.ClientError) as exc:
        if resp is None:
            if isinstance(exc, UpstreamError):
                raise to_registry_error(exc, not_found=BlobUnknown) from exc
            raise
        abort(request)
        return resp
    if f"{digest.partition(':')[0]}:{hasher.hexdigest()}" != digest:
        log.warning("uncached relay failed verification digest=%s", digest)
        abort(request)
        return resp
    await resp.write(held)
    await resp.write_eof()
    return resp
