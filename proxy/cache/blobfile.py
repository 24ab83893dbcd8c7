"""A cached blob's file as an HTTP answer: ``sendfile`` on plain TCP, through public aiohttp API.

aiohttp's ``FileResponse`` sends with ``loop.sendfile``, which uvloop lacks (it then reads 256 KiB
chunks in the thread pool and writes each), and it opens, stats and closes the file in the
thread pool on every request. :class:`BlobFileResponse` is a ``web.StreamResponse`` that opens
and stats the file on the loop (a cached blob is a local file), answers what ``FileResponse``
answered (``Range`` and ``If-Range``, ``If-None-Match`` and ``If-Modified-Since`` with a
``304``; a blob's ETag is its digest), and sends the body with
:func:`proxy.cache.sendfile.sendfile_to_transport`, or, over TLS, in chunks read in the thread pool.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.cache.sendfile import can_sendfile, sendfile_to_transport

#: Bytes per read when the transport cannot sendfile (TLS).
CHUNK = 256 * 1024


class BlobFileResponse(web.StreamResponse):
    """The blob file at ``path``; counted in ``in_use`` (never evicted) until it is sent."""

    def __init__(
        self,
        path: Path | str,
        *,
        digest: str,
        in_use: Counter[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(headers=headers)
        self._path = path
        self._digest = digest
        self._in_use = in_use
        if in_use is not None:
            in_use[digest] += 1

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        try:
            try:
                fd = os.open(self._path, os.O_RDONLY)
            except FileNotFoundError:
                self.set_status(404)  # evicted since the handler looked
                return await super().prepare(request)
            try:
                return await self._send(request, fd)
            finally:
                os.close(fd)
        finally:
            self._done()

    def _done(self) -> None:
        in_use, self._in_use = self._in_use, None
        if in_use is not None:
            in_use[self._digest] -= 1
            if in_use[self._digest] <= 0:
                del in_use[self._digest]

    async def _send(self, request: web.BaseRequest, fd: int) -> AbstractStreamWriter | None:
        st = os.fstat(fd)
        size = st.st_size
        self.etag = self._digest
        self.last_modified = st.st_mtime
        if _not_modified(request, self._digest, st.st_mtime):
            self.set_status(304)
            return await super().prepare(request)
        start, count = 0, size
        if_range = request.if_range
        if if_range is None or st.st_mtime <= if_range.timestamp():
            try:
                wanted = request.http_range
            except ValueError:
                wanted = slice(size, None)  # a 416, below
            if wanted.start is not None or wanted.stop is not None:
                if wanted.start is None or wanted.start < 0:  # the last bytes
                    suffix = -(wanted.start if wanted.start is not None else wanted.stop or 0)
                    start = max(0, size - suffix)
                    count = size - start
                else:
                    start = wanted.start
                    count = min(size if wanted.stop is None else wanted.stop, size) - start
                if start >= size:
                    self.headers["Content-Range"] = f"bytes */{size}"
                    self.set_status(416)
                    return await super().prepare(request)
                self.set_status(206)
                self.headers["Content-Range"] = f"bytes {start}-{start + count - 1}/{size}"
        self.content_length = count
        writer = await super().prepare(request)
        if request.method == "HEAD" or count == 0:
            return writer
        assert writer is not None
        transport = request.transport
        if transport is not None and can_sendfile(transport):
            sent = await sendfile_to_transport(transport, fd, start, count)
            writer.output_size += sent  # what the access log's bytes= reports
            if sent != count:
                raise ConnectionResetError("blob file shorter than announced")
        else:
            loop = asyncio.get_running_loop()
            end = start + count
            while start < end:
                want = min(CHUNK, end - start)
                chunk = await loop.run_in_executor(None, os.pread, fd, want, start)
                if not chunk:
                    raise ConnectionResetError("blob file shorter than announced")
                await self.write(chunk)
                start += len(chunk)
        await self.write_eof()
        return writer


def _not_modified(request: web.BaseRequest, digest: str, mtime: float) -> bool:
    """``If-None-Match`` (the digest, or ``*``), else ``If-Modified-Since``, as RFC 9110 orders
    them (GET and HEAD only)."""
    if request.method not in ("GET", "HEAD"):
        return False
    if_none_match = request.if_none_match
    if if_none_match is not None:
        return any(tag.value in (digest, "*") for tag in if_none_match)
    since = request.if_modified_since
    return since is not None and int(mtime) <= since.timestamp()
