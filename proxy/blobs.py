"""The blob read path: local first, else one shared upstream download teed to every client.

A cold blob is fetched by one :class:`Download` task per digest, owned by the app (not by the
request that started it), which writes the upstream bytes to a temp file while hashing them.
Every client asking for that digest meanwhile, the first included, follows the growing file
(:func:`stream_download`) and gets bytes as soon as they arrive — containerd gives up after 30 s
without response headers, so nothing waits for the whole blob.

Two rules keep a client from ever receiving a complete but wrong blob:

* the last byte is held back until the download is verified (size and digest) and committed;
* if it fails, the client's connection is aborted short of ``Content-Length``, which every
  client reports as an error, and nothing is committed.

A client that disconnects leaves the download running for the others and for the cache.
An upstream connection cut mid-blob is resumed with a ``Range`` request from the last byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import (
    BlobUnknown,
    RangeInvalid,
    StorageError,
    UpstreamContentError,
    UpstreamError,
    UpstreamUnreachable,
    to_registry_error,
)
from proxy.sendfile import can_sendfile, sendfile_to_transport
from proxy.upstream import Upstream
from storage.base import BlobWriter, ContentStore

if TYPE_CHECKING:
    from proxy.metrics import Metrics
    from storage.eviction import CacheManager
    from storage.redis import RedisCoordinator

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
#: Upstream reconnects (with ``Range``) in a row that bring no new byte before giving up.
MAX_RESUMES = 5


@dataclass(eq=False)
class Download:
    """One upstream fetch of one blob, shared by every client that wants it."""

    digest: str
    upstream: Upstream
    repository: str
    #: Size from upstream's ``Content-Length``; None until headers arrived or if not sent.
    size: int | None = None
    #: Bytes in the temp file so far.
    written: int = 0
    committed: bool = False
    error: BaseException | None = None
    writer: BlobWriter | None = None
    path: Path | None = None
    started: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self) -> None:
        await self._changed.wait()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # retrieved here; each waiter re-raises it
        self._notify()


class BlobService:
    """Serves blobs from the content store, fetching misses from upstream once."""

    def __init__(
        self,
        store: ContentStore,
        *,
        offline: bool = False,
        metrics: Metrics | None = None,
        cache: CacheManager | None = None,
    ) -> None:
        self.store = store
        self.offline = offline
        self.metrics = metrics
        self.cache = cache
        #: Cross-replica single flight (Redis); None: this process only.
        self.coordinator: RedisCoordinator | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.downloads: dict[str, Download] = {}

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def held_elsewhere(self, digest: str, upstream: Upstream, repository: str) -> bool:
        """Cached, or being downloaded for another repository (see ``proxy.links``)."""
        dl = self.downloads.get(digest)
        if dl is not None and (dl.upstream.name, dl.repository) != (upstream.name, repository):
            return True
        return await self.store.stat_blob(digest) is not None

    def download(self, upstream: Upstream, repository: str, digest: str) -> Download:
        """The download in flight for ``digest``, or a new one."""
        current = self.downloads.get(digest)
        if current is not None and not current.done:
            return current
        # `downloads` is the coalescing map: one running Download per digest. A failed one is
        # `done` at once, so the next request starts afresh even while the old task unwinds.
        dl = Download(digest=digest, upstream=upstream, repository=repository)
        self.downloads[digest] = dl
        task = asyncio.ensure_future(self._run(dl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dl

    async def _run(self, dl: Download) -> None:
        try:
            if self.coordinator is None:
                await self._fetch(dl)
            else:
                await self._coordinated(dl, self.coordinator)
        except asyncio.CancelledError:
            dl.fail(UpstreamUnreachable("download cancelled", upstream=dl.upstream.name))
            raise
        except (UpstreamError, StorageError) as exc:
            if isinstance(exc, StorageError) and self.metrics is not None:
                self.metrics.storage_errors.labels("write").inc()
            log.warning(
                "blob download failed digest=%s upstream=%s error=%s",
                dl.digest,
                dl.upstream.name,
                exc,
            )
            dl.fail(exc)
        except Exception as exc:
            log.exception("blob download crashed digest=%s", dl.digest)
            dl.fail(exc)
        finally:
            if dl.writer is not None and not dl.committed:
                await dl.writer.cancel()
            if self.downloads.get(dl.digest) is dl:
                del self.downloads[dl.digest]

    async def _fetch(self, dl: Download) -> None:
        upstream = dl.upstream
        path = f"/v2/{dl.repository}/blobs/{dl.digest}"
        scope = f"repository:{dl.repository}:pull"
        resumes = 0  # consecutive attempts that brought no new byte
        progress = -1
        while True:
            headers = {"Range": f"bytes={dl.written}-"} if dl.written else {}
            try:
                async with upstream.request(
                    "GET", path, scope=scope, headers=headers, expect=(200, 206)
                ) as resp:
                    skip = self._start_or_resume(dl, resp)
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        if dl.size is not None and dl.written + len(chunk) > dl.size:
                            raise UpstreamContentError(
                                "upstream sent more bytes than announced", upstream=upstream.name
                            )
                        assert dl.writer is not None
                        dl.writer.write(chunk)
                        dl.written += len(chunk)
                        if self.metrics is not None:
                            self.metrics.upstream_bytes.labels(upstream.name).inc(len(chunk))
                        dl._notify()
                if dl.size is None or dl.written >= dl.size:
                    break
                raise UpstreamUnreachable("connection ended early", upstream=upstream.name)
            except (
                TimeoutError,
                aiohttp.ClientPayloadError,
                aiohttp.ClientConnectionError,
                UpstreamUnreachable,
            ) as exc:
                # The stream broke mid-blob: resume from the last byte we have, for as long as
                # attempts keep bringing bytes.
                resumes = 0 if dl.written > progress else resumes + 1
                progress = dl.written
                if dl.writer is None or resumes >= MAX_RESUMES:
                    raise UpstreamUnreachable(
                        f"blob download broke: {type(exc).__name__}", upstream=upstream.name
                    ) from exc
                log.info(
                    "resuming blob download digest=%s offset=%d attempt=%d",
                    dl.digest,
                    dl.written,
                    resumes,
                )
        assert dl.writer is not None
        try:
            await dl.writer.commit(dl.digest, dl.size)
        except UpstreamContentError as exc:
            exc.upstream = upstream.name
            raise
        dl.committed = True
        dl.path = self.store.blob_path(dl.digest)
        dl._notify()
        log.debug("blob cached digest=%s size=%d", dl.digest, dl.written)

    async def _coordinated(self, dl: Download, coordinator: RedisCoordinator) -> None:
        """Fetch it ourselves if no other replica is, else follow that replica's temp file."""
        for _ in range(3):
            owned = await coordinator.acquire(dl.digest)
            if owned is None:  # Redis is away: per-replica behaviour
                await self._fetch(dl)
                return
            if owned:
                refresher = asyncio.create_task(self._keep_lock(dl, coordinator))
                try:
                    await self._fetch(dl)
                finally:
                    refresher.cancel()
                    await coordinator.release(dl.digest)
                return
            await self._confirm_before_following(dl, coordinator)
            if await self._follow_remote(dl, coordinator):
                return
            if dl.started.done():
                raise UpstreamUnreachable(
                    "the replica downloading this blob failed", upstream=dl.upstream.name
                )
        raise UpstreamUnreachable("could not coordinate the download", upstream=dl.upstream.name)

    async def _confirm_before_following(self, dl: Download, coordinator: RedisCoordinator) -> None:
        """Another replica fetches it, maybe for another repository: ours must hold it too."""
        info = await coordinator.inflight(dl.digest)
        if info is not None and (info.get("upstream"), info.get("repository")) == (
            dl.upstream.name,
            dl.repository,
        ):
            return
        async with dl.upstream.request(
            "HEAD",
            f"/v2/{dl.repository}/blobs/{dl.digest}",
            scope=f"repository:{dl.repository}:pull",
        ):
            pass  # 200; anything else raised UpstreamStatus

    async def _keep_lock(self, dl: Download, coordinator: RedisCoordinator) -> None:
        published = False
        while True:
            if not published and dl.writer is not None:
                relative = str(dl.writer.path.relative_to(self.store.root))
                await coordinator.publish(
                    dl.digest, relative, dl.size, dl.upstream.name, dl.repository
                )
                published = True
            await asyncio.sleep(0.05 if not published else 5.0)
            if published:
                await coordinator.refresh(dl.digest)

    async def _follow_remote(self, dl: Download, coordinator: RedisCoordinator) -> bool:
        """Stream another replica's download from the shared volume; False if it vanished."""
        while True:
            size = await self.store.stat_blob(dl.digest)
            if size is not None:  # committed (verified) by the owner
                dl.size, dl.written, dl.path = size, size, self.store.blob_path(dl.digest)
                dl.committed = True
                if not dl.started.done():
                    dl.started.set_result(None)
                dl._notify()
                return True
            info = await coordinator.inflight(dl.digest)
            if info is not None and not dl.started.done():
                path = (self.store.root / str(info.get("path"))).resolve()
                if not path.is_relative_to((self.store.root / "tmp").resolve()):
                    log.error("ignoring an in-flight record outside tmp/ digest=%s", dl.digest)
                    return False
                dl.size = info.get("size")
                dl.path = path
                dl.started.set_result(None)
            if dl.path is not None and dl.started.done():
                # FileNotFoundError: renamed at commit (seen on the next turn), or failed
                with contextlib.suppress(FileNotFoundError):
                    dl.written = os.stat(dl.path).st_size
                dl._notify()
            if not await coordinator.locked(dl.digest):
                if await self.store.stat_blob(dl.digest) is not None:
                    continue
                return False
            await asyncio.sleep(0.05)

    def _start_or_resume(self, dl: Download, resp: aiohttp.ClientResponse) -> int:
        """Check the response against what we have; return how many leading bytes to skip."""
        if dl.writer is None:
            length = resp.content_length if resp.status == 200 else None
            if resp.status == 206:
                raise UpstreamContentError("unrequested partial content", upstream=dl.upstream.name)
            dl.size = length
            dl.writer = self.store.blob_writer(dl.digest)
            dl.path = dl.writer.path
            dl.started.set_result(None)
            dl._notify()
            return 0
        if resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {dl.written}-"):
                raise UpstreamContentError(
                    "upstream resumed at the wrong offset", upstream=dl.upstream.name
                )
            return 0
        # 200 to a Range request: the upstream cannot resume; skip what we already have.
        if dl.size is not None and resp.content_length not in (None, dl.size):
            raise UpstreamContentError("blob size changed on resume", upstream=dl.upstream.name)
        return dl.written

    # -- serving ---------------------------------------------------------------------------------

    async def serve(
        self, request: web.Request, upstream: Upstream, repository: str, digest: str
    ) -> web.StreamResponse:
        head = request.method == "HEAD"
        size = await self.store.stat_blob(digest)
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
            local = self._serve_local(request, digest, size)
            if local is not None:
                return local
        if self.offline:
            raise BlobUnknown({"digest": digest}, message="blob not cached (offline mode)")
        if head:
            return await self._head_upstream(upstream, repository, digest)
        dl = self.download(upstream, repository, digest)
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
            local = self._serve_local(request, digest, dl.written)
            if local is None:
                raise BlobUnknown({"digest": digest}, message="blob evicted while downloading")
            return local
        return await stream_download(request, dl, digest)

    async def read(
        self, upstream: Upstream, repository: str, digest: str, limit: int = 4 * 1024 * 1024
    ) -> bytes:
        """A small blob's bytes (an image config), through the cache."""
        if await self.store.stat_blob(digest) is None:
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
        path = self.store.blob_path(digest)
        try:
            with open(path, "rb") as handle:  # noqa: ASYNC230 - a config blob: a few KiB
                return handle.read(limit)
        except OSError as exc:
            raise StorageError("cannot read blob", path=str(path)) from exc

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
        while not dl.done:
            await dl.wait_change()
        if dl.error is not None:
            if isinstance(dl.error, UpstreamError):
                raise to_registry_error(dl.error, not_found=BlobUnknown)
            raise dl.error

    def _serve_local(
        self, request: web.Request, digest: str, size: int
    ) -> web.StreamResponse | None:
        """The cached blob (None if it vanished since its stat: evicted, fetch it again)."""
        path = self.store.blob_path(digest)
        start = request.http_range.start
        if start is not None and start >= size:
            raise RangeInvalid({"size": size}, headers={"Content-Range": f"bytes */{size}"})
        try:
            # Opened here, not only by the file response, so that an unreadable file is a
            # logged storage error (503) rather than aiohttp's silent 403 or 404.
            os.close(os.open(path, os.O_RDONLY))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if self.metrics is not None:
                self.metrics.storage_errors.labels("read").inc()
            log.error("cannot read cached blob path=%s error=%s", path, exc.strerror)
            raise StorageError("cannot read cached blob", path=str(path)) from exc
        if self.cache is not None:
            self.cache.touch(path, digest)
        resp = _BlobFileResponse(
            path,
            in_use=self.cache.in_use if self.cache is not None else None,
            digest=digest,
            chunk_size=CHUNK,
            headers={
                "Docker-Content-Digest": digest,
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
                "X-Cache": "HIT",
                "Cache-Control": "max-age=31536000, immutable",
            },
        )
        request["cache"] = "hit"
        return resp

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
        return _miss_response(digest, length)


class _BlobFileResponse(web.FileResponse):
    """A cached blob sent with sendfile; counted in use (never evicted) until it is sent."""

    def __init__(
        self, path: Path, *, in_use: Counter[str] | None, digest: str, **kwargs: Any
    ) -> None:
        super().__init__(path, **kwargs)
        self._in_use = in_use
        self._digest = digest
        if in_use is not None:
            in_use[digest] += 1

    async def _sendfile(
        self, request: web.BaseRequest, fobj: Any, offset: int, count: int
    ) -> AbstractStreamWriter:
        if not can_sendfile(request.transport):
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None and request.transport is not None
        sent = await sendfile_to_transport(request.transport, fobj.fileno(), offset, count)
        writer.output_size += sent
        if sent != count:
            raise ConnectionResetError("blob file shorter than announced")
        await web.StreamResponse.write_eof(self)
        return writer

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            if self._in_use is not None:
                self._in_use[self._digest] -= 1
                if self._in_use[self._digest] <= 0:
                    del self._in_use[self._digest]
                self._in_use = None


def _miss_response(digest: str, size: int | None) -> web.StreamResponse:
    """Headers of a blob answered from upstream (no body yet)."""
    resp = web.StreamResponse(
        headers={
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "X-Cache": "MISS",
        }
    )
    if size is not None:
        resp.content_length = size
    return resp


async def relay_uncached(
    request: web.Request,
    resp: web.StreamResponse | None,
    upstream: Upstream,
    repository: str,
    digest: str,
    fd: int | None,
    offset: int,
) -> web.StreamResponse:
    """Send a blob (from ``offset`` on) straight from upstream, verified but not cached.

    Used when the cache cannot store it. The bytes the client already got are re-hashed from
    the temp file still open at ``fd``; the last byte is held back until the digest matches.
    """
    hasher = hashlib.new(digest.partition(":")[0])
    pos = 0
    while fd is not None and pos < offset:
        chunk = os.pread(fd, min(CHUNK, offset - pos), pos)
        if not chunk:
            break
        hasher.update(chunk)
        pos += len(chunk)
    if pos != offset:
        _abort(request)
        return resp or web.StreamResponse()
    log.warning("cache cannot store blob, relaying it uncached digest=%s offset=%d", digest, offset)
    request["cache"] = "miss-uncached"
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
                resp = _miss_response(digest, up.content_length)
                await resp.prepare(request)
            skip = offset if up.status == 200 else 0
            held = b""
            async for chunk in up.content.iter_chunked(CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                hasher.update(chunk)
                data = held + chunk
                held = data[-1:]
                if len(data) > 1:
                    await resp.write(data[:-1])
    except (TimeoutError, UpstreamError, aiohttp.ClientError) as exc:
        if resp is None:
            if isinstance(exc, UpstreamError):
                raise to_registry_error(exc, not_found=BlobUnknown) from exc
            raise
        _abort(request)
        return resp
    if f"{digest.partition(':')[0]}:{hasher.hexdigest()}" != digest:
        log.warning("uncached relay failed verification digest=%s", digest)
        _abort(request)
        return resp
    await resp.write(held)
    await resp.write_eof()
    return resp


async def stream_download(request: web.Request, dl: Download, digest: str) -> web.StreamResponse:
    """Follow ``dl``'s temp file to the client, holding the last byte until it is verified."""
    resp = _miss_response(digest, dl.size)
    request["cache"] = "miss"
    assert dl.path is not None
    try:
        # dl.path is the temp file until commit and the final file after: both hold the bytes.
        fd = os.open(dl.path, os.O_RDONLY)
    except OSError as exc:
        cause = dl.error or StorageError("cannot open download", path=str(dl.path))
        if isinstance(cause, UpstreamError):
            raise to_registry_error(cause, not_found=BlobUnknown) from exc
        raise cause from exc
    offset = 0
    try:
        writer = await resp.prepare(request)
        # sendfile needs a known length (no chunked framing) and a plain TCP transport
        zero_copy = dl.size is not None and can_sendfile(request.transport)
        while True:
            if dl.error is not None:
                raise _Aborted(dl.error)
            # Until commit, keep the final byte back: a wrong blob must never look complete.
            limit = dl.written if dl.committed else dl.written - 1
            if offset < limit:
                offset += await _send_range(
                    request, resp, writer, fd, offset, limit - offset, zero_copy
                )
                continue
            if dl.committed:
                break
            await dl.wait_change()
        await resp.write_eof()
        return resp
    except ConnectionResetError:
        # The client left; the download goes on for the others and the cache.
        log.info("client left during a download digest=%s sent=%d", digest, offset)
        request["cache"] = "client-gone"
        return resp
    except _Aborted as exc:
        if isinstance(exc.cause, StorageError):
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
        request["cache"] = "miss-aborted"
        if not resp.prepared:
            if isinstance(exc.cause, UpstreamError):
                raise to_registry_error(exc.cause, not_found=BlobUnknown) from exc.cause
            raise
        _abort(request)
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
        raise _Aborted(StorageError("temp file shorter than written", path=""))
    return sent


class _Aborted(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _abort(request: web.Request) -> None:
    """Cut the client's connection so a short body can never pass for a whole one."""
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()
