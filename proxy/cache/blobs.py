"""Blob answers over HTTP: local first, else one shared download teed to every client.

:class:`BlobService` decides, per request, where a blob's bytes come from:

* a local file (the filesystem store, or the S3 store's local read tier): ``sendfile``;
* the object store, not local here: a ``307`` to a presigned URL when ``s3.redirect`` is on, a
  ``Range`` read streamed from the bucket, or (a whole GET) a :class:`proxy.fetch.download.Download`
  that fills the local tier while the client follows it;
* nothing cached: a download from upstream (``proxy.fetch.downloads``), followed by every client
  asking meanwhile (:func:`stream_download`) — containerd gives up after 30 s without response
  headers, so nothing waits for the whole blob.

Two rules keep a client from ever receiving a complete but wrong blob:

* the last byte is held back until the download is verified (size and digest; making it durable,
  an fsync or an upload's completion, may still be under way);
* if it fails, the client's connection is aborted short of ``Content-Length``, which every
  client reports as an error, and nothing is committed.

When the store fails (disk full, object store away) the client is served by ``proxy.cache.relay``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.cache.blobfile import BlobFileResponse
from proxy.cache.relay import abort, miss_response, relay_uncached
from proxy.cache.sendfile import can_sendfile, sendfile_to_transport
from proxy.core.errors import (
    BlobUnknown,
    RangeInvalid,
    StorageError,
    UpstreamContentError,
    UpstreamError,
    UpstreamUnreachable,
    to_registry_error,
)
from proxy.fetch.download import CACHE_RESULT, CHUNK, Cache, Download
from proxy.fetch.downloads import Downloads
from proxy.fetch.upstream import Upstream
from storage.base import LocalFile
from storage.content import ContentStore

if TYPE_CHECKING:
    from proxy.core.metrics import Metrics
    from storage.eviction import CacheManager
    from storage.redis import RedisCoordinator

log = logging.getLogger(__name__)

HIT_HEADERS = {
    "Content-Type": "application/octet-stream",
    "Accept-Ranges": "bytes",
    "X-Cache": "HIT",
    "Cache-Control": "max-age=31536000, immutable",
}


class BlobService:
    """Serves blobs from the content store, fetching misses from upstream once."""

    def __init__(
        self,
        store: ContentStore,
        *,
        offline: bool = False,
        metrics: Metrics | None = None,
        cache: CacheManager | None = None,
        redirect_expiry: float | None = None,
        advertise_url: str | None = None,
    ) -> None:
        self.store = store
        self.offline = offline
        self.metrics = metrics
        self.cache = cache
        #: Seconds a presigned redirect lives; None: never redirect.
        self.redirect_expiry = redirect_expiry
        self.fetcher = Downloads(store, metrics=metrics, advertise_url=advertise_url)
        #: Downloads in flight by digest (read-only for callers).
        self.downloads: dict[str, Download] = self.fetcher.running

    @property
    def coordinator(self) -> RedisCoordinator | None:
        return self.fetcher.coordinator

    @coordinator.setter
    def coordinator(self, value: RedisCoordinator | None) -> None:
        self.fetcher.coordinator = value

    async def close(self) -> None:
        await self.fetcher.close()

    async def held_elsewhere(self, digest: str, upstream: Upstream, repository: str) -> bool:
        """Cached, or being downloaded for another repository (see ``proxy.cache.links``)."""
        dl = self.downloads.get(digest)
        if dl is not None and (dl.upstream.name, dl.repository) != (upstream.name, repository):
            return True
        try:
            return await self.store.stat_blob(digest) is not None
        except StorageError as exc:
            if not exc.unreachable:
                raise
            return False  # the object store is away: fetched from this repository, or relayed

    def download(
        self, upstream: Upstream, repository: str, digest: str, *, stored: bool = False
    ) -> Download:
        """The download in flight for ``digest``, or a new one."""
        return self.fetcher.get(upstream, repository, digest, stored=stored)

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self, request: web.Request, upstream: Upstream, repository: str, digest: str
    ) -> web.StreamResponse:
        head = request.method == "HEAD"
        try:
            local = self.store.local_blob(digest)
            size = local.size if local is not None else await self.store.stat_blob(digest)
        except StorageError as exc:
            if self.offline or head or not exc.unreachable:
                raise
            # The store is away: the client still gets verified bytes, straight from upstream.
            return await relay_uncached(request, None, upstream, repository, digest, None, 0)
        try:
            wanted = request.http_range
        except ValueError:
            if size is None:  # not cached: a malformed Range is ignored (RFC 9110 allows it)
                wanted = slice(None, None)
            else:
                raise RangeInvalid(
                    {"range": request.headers.get("Range", "")[:100]},
                    headers={"Content-Range": f"bytes */{size}"},
                ) from None
        ranged = wanted.start is not None or wanted.stop is not None
        if size is not None:
            if wanted.start is not None and wanted.start >= size:
                raise RangeInvalid({"size": size}, headers={"Content-Range": f"bytes */{size}"})
            if local is not None:
                return self._serve_file(request, digest, local)
            return await self._serve_stored(request, upstream, repository, digest, size, wanted)
        if self.offline:
            raise BlobUnknown({"digest": digest}, message="blob not cached (offline mode)")
        if head:
            return await self._head_upstream(upstream, repository, digest)
        dl = self.download(upstream, repository, digest)
        # Found verified and being made durable: every byte is on this disk already.
        cache = Cache.HIT if dl.verified else Cache.MISS
        try:
            await dl.started
        except UpstreamError as exc:
            raise to_registry_error(exc, not_found=BlobUnknown) from exc
        except StorageError:
            # The cache cannot take it (disk full, read-only): the client still gets the blob.
            return await relay_uncached(request, None, upstream, repository, digest, None, 0)
        if ranged:
            # A range of a blob still downloading: wait for the verified whole, then serve it.
            await self._wait_done(dl)
            return await self.serve(request, upstream, repository, digest)
        return await stream_download(request, dl, digest, self.store, cache=cache)

    async def _serve_stored(
        self,
        request: web.Request,
        upstream: Upstream,
        repository: str,
        digest: str,
        size: int,
        wanted: slice,
    ) -> web.StreamResponse:
        """A blob in the object store but not on this replica's disk."""
        self._touch(digest)
        request[CACHE_RESULT] = Cache.HIT
        if request.method == "HEAD":
            resp = web.StreamResponse(headers={"Docker-Content-Digest": digest, **HIT_HEADERS})
            resp.content_length = size
            return resp
        if self.redirect_expiry is not None:
            url = await self.store.blob_url(digest, self.redirect_expiry)
            if url is not None:
                raise web.HTTPTemporaryRedirect(
                    url, headers={"Docker-Content-Digest": digest, "X-Cache": "HIT"}
                )
        if wanted.start is not None or wanted.stop is not None:
            return await self._stream_range(request, digest, size, wanted)
        dl = self.download(upstream, repository, digest, stored=True)
        try:
            await dl.started
        except UpstreamError as exc:
            raise to_registry_error(exc, not_found=BlobUnknown) from exc
        try:
            return await stream_download(request, dl, digest, self.store, cache=Cache.HIT)
        except StorageError:
            if not dl.committed:
                raise
            # Verified, but larger than the local tier takes: stream it from the bucket.
            return await self._stream_range(request, digest, size, slice(0, size), whole=True)

    async def _stream_range(
        self, request: web.Request, digest: str, size: int, wanted: slice, *, whole: bool = False
    ) -> web.StreamResponse:
        start = wanted.start
        stop = wanted.stop
        if start is None:  # a suffix: the last -stop bytes
            start, stop = max(0, size + (stop or 0)), size
        stop = size if stop is None else min(stop, size)
        stream = await self.store.read_blob(digest, start, stop - start)
        if stream is None:
            raise BlobUnknown({"digest": digest}, message="blob evicted meanwhile")
        headers = {"Docker-Content-Digest": digest, **HIT_HEADERS}
        if not whole:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        resp = web.StreamResponse(status=200 if whole else 206, headers=headers)
        resp.content_length = stop - start
        await resp.prepare(request)
        sent = 0
        try:
            async for chunk in stream:
                await resp.write(chunk)
                sent += len(chunk)
        except StorageError as exc:
            log.warning("object store read broke digest=%s error=%s", digest, exc)
        if sent != stop - start:
            abort(request)
            return resp
        await resp.write_eof()
        return resp

    async def read(
        self, upstream: Upstream, repository: str, digest: str, limit: int = 4 * 1024 * 1024
    ) -> bytes:
        """A small blob's bytes (an image config), through the cache."""
        try:
            stored = await self.store.stat_blob(digest)
        except StorageError as exc:
            if not exc.unreachable:
                raise
            return await self._read_uncached(upstream, repository, digest, limit)
        if stored is None:
            if self.offline:
                raise BlobUnknown({"digest": digest}, message="blob not cached (offline mode)")
            dl = self.download(upstream, repository, digest)
            try:
                await dl.started
                await self._wait_done(dl)
            except UpstreamError as exc:
                raise to_registry_error(exc, not_found=BlobUnknown) from exc
            except StorageError:
                return await self._read_uncached(upstream, repository, digest, limit)
        local = self.store.local_blob(digest)
        if local is not None:
            try:
                with open(local.path, "rb") as handle:  # noqa: ASYNC230 - a config: a few KiB
                    return handle.read(limit)
            except OSError as exc:
                raise StorageError("cannot read blob", path=str(local.path), op="read") from exc
        stream = await self.store.read_blob(digest, 0, limit)
        if stream is None:
            raise BlobUnknown({"digest": digest}, message="blob evicted meanwhile")
        return b"".join([chunk async for chunk in stream])

    async def _read_uncached(
        self, upstream: Upstream, repository: str, digest: str, limit: int
    ) -> bytes:
        try:
            async with upstream.request(
                "GET", f"/v2/{repository}/blobs/{digest}", scope=f"repository:{repository}:pull"
            ) as resp:
                data = await resp.content.read(limit)
        except UpstreamError as exc:
            raise to_registry_error(exc, not_found=BlobUnknown) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise to_registry_error(
                UpstreamUnreachable(type(exc).__name__, upstream=upstream.name),
                not_found=BlobUnknown,
            ) from exc
        algorithm = digest.partition(":")[0]
        if f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != digest:
            raise to_registry_error(
                UpstreamContentError("blob does not match its digest", upstream=upstream.name),
                not_found=BlobUnknown,
            )
        return data

    async def _wait_done(self, dl: Download) -> None:
        await dl.wait_done()
        if dl.error is not None:
            if isinstance(dl.error, UpstreamError):
                raise to_registry_error(dl.error, not_found=BlobUnknown)
            raise dl.error

    def _touch(self, digest: str) -> None:
        if self.cache is not None:
            self.cache.touch("blobs", digest)

    def _serve_file(
        self, request: web.Request, digest: str, local: LocalFile
    ) -> web.StreamResponse:
        """A blob in a local file, sent with sendfile."""
        try:
            # Opened here, not only by the file response, so that an unreadable file is a
            # logged storage error (503) rather than aiohttp's silent 403 or 404.
            os.close(os.open(local.path, os.O_RDONLY))
        except FileNotFoundError:
            raise BlobUnknown({"digest": digest}, message="blob evicted meanwhile") from None
        except OSError as exc:
            if self.metrics is not None:
                self.metrics.storage_errors.labels("read").inc()
            log.error("cannot read cached blob path=%s error=%s", local.path, exc.strerror)
            raise StorageError("cannot read cached blob", path=str(local.path), op="read") from exc
        self._touch(digest)
        request[CACHE_RESULT] = Cache.HIT
        return BlobFileResponse(
            local.path,
            digest=digest,
            in_use=self.cache.in_use if self.cache is not None else None,
            headers={"Docker-Content-Digest": digest, **HIT_HEADERS},
        )

    async def _head_upstream(
        self, upstream: Upstream, repository: str, digest: str
    ) -> web.StreamResponse:
        try:
            async with upstream.request(
                "HEAD", f"/v2/{repository}/blobs/{digest}", scope=f"repository:{repository}:pull"
            ) as resp:
                length = resp.content_length
        except UpstreamError as exc:
            raise to_registry_error(exc, not_found=BlobUnknown) from exc
        return miss_response(digest, length)


def _open_download(dl: Download, store: ContentStore) -> int:
    """An fd on the download's bytes: its spool, or the committed file once it moved."""
    for _ in range(2):
        path = dl.path
        if path is not None:
            try:
                return os.open(str(path), os.O_RDONLY)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError("cannot open download", path=str(path), op="read") from exc
        if dl.committed:
            local = store.local_blob(dl.digest)
            if local is not None:
                try:
                    return os.open(local.path, os.O_RDONLY)
                except FileNotFoundError:
                    pass
    cause = dl.error or StorageError("download vanished", path=str(dl.path), op="read")
    raise cause


async def stream_download(
    request: web.Request,
    dl: Download,
    digest: str,
    store: ContentStore,
    *,
    cache: Cache = Cache.MISS,
    start: int = 0,
) -> web.StreamResponse:
    """Follow ``dl``'s local file to the client, holding the last byte until it is verified.

    ``start``: from that byte on, as a ``206`` (a peer that has the bytes before it; the size
    must be known).
    """
    resp = miss_response(digest, None if dl.size is None else dl.size - start, cache)
    if start:
        assert dl.size is not None
        resp.set_status(206)
        resp.headers["Content-Range"] = f"bytes {start}-{dl.size - 1}/{dl.size}"
    request[CACHE_RESULT] = cache
    try:
        fd = _open_download(dl, store)
    except UpstreamError as exc:
        raise to_registry_error(exc, not_found=BlobUnknown) from exc
    offset = start
    try:
        writer = await resp.prepare(request)
        # sendfile needs a known length (no chunked framing) and a plain TCP transport
        zero_copy = dl.size is not None and can_sendfile(request.transport)
        while True:
            if dl.error is not None and not dl.verified:
                raise _Aborted(dl.error)
            # Until verified, keep the final byte back: a wrong blob must never look complete.
            # Once verified, the local file holds the whole blob, whatever becomes of the upload.
            done = dl.verified or dl.committed
            limit = dl.written if done else dl.written - 1
            if offset < limit:
                offset += await _send_range(
                    request, resp, writer, fd, offset, limit - offset, zero_copy
                )
                continue
            if done:
                break
            await dl.wait_change()
        await resp.write_eof()
        return resp
    except ConnectionResetError:
        # The client left; the download goes on for the others and the cache.
        log.info("client left during a download digest=%s sent=%d", digest, offset)
        request[CACHE_RESULT] = Cache.CLIENT_GONE
        return resp
    except _Aborted as exc:
        if isinstance(exc.cause, StorageError) and dl.source == "upstream":
            # The cache failed mid-download (disk full): finish this client from upstream.
            return await relay_uncached(
                request,
                resp if resp.prepared else None,
                dl.upstream,
                dl.repository,
                digest,
                fd,
                offset,
            )
        log.warning(
            "aborting client response digest=%s sent=%d error=%s", digest, offset, exc.cause
        )
        if not resp.prepared:
            request[CACHE_RESULT] = Cache.ABORTED
            if isinstance(exc.cause, UpstreamError):
                raise to_registry_error(exc.cause, not_found=BlobUnknown) from exc.cause
            raise
        abort(request)
        return resp
    finally:
        os.close(fd)


async def _send_range(
    request: web.Request,
    resp: web.StreamResponse,
    writer: AbstractStreamWriter | None,
    fd: int,
    offset: int,
    count: int,
    zero_copy: bool,
) -> int:
    """Send up to ``count`` bytes of ``fd`` from ``offset``; return how many went out."""
    if zero_copy and request.transport is not None:
        sent = await sendfile_to_transport(request.transport, fd, offset, count)
        if writer is not None:
            writer.output_size += sent  # what the access log's bytes= reports
    else:
        data = os.pread(fd, min(CHUNK, count), offset)
        await resp.write(data)
        sent = len(data)
    if not sent:
        raise _Aborted(StorageError("temp file shorter than written", op="read"))
    return sent


class _Aborted(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
