"""The coalescing map of downloads and the machine that fills them.

A :class:`~proxy.fetch.download.Download` is owned by the app (not by the request that started
it), so a client that leaves does not stop it. It spools the bytes through a
:class:`storage.base.BlobWriter` whose local file every client of this process follows as it
grows (``proxy.cache.blobs.stream_download``). Where the bytes come from
(``Download.source``):

* ``upstream`` — the registry, written durably to the store (on S3: multipart straight to the
  content key). A connection cut mid-blob resumes with ``Range`` from the last byte.
* ``store`` — the blob is in the store but not on this replica's disk (S3): read it once into the
  local read tier, verified against its digest like anything from upstream.
* ``peer`` — another replica is downloading it (:mod:`proxy.fetch.fleet`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import aiohttp

from proxy.core.errors import (
    StorageError,
    UpstreamContentError,
    UpstreamError,
    UpstreamUnreachable,
)
from proxy.fetch import rawbody, threadget
from proxy.fetch.download import (
    MAX_RESUMES,
    PRESIGNED_OFF_FOR,
    PUBLISH_GRACE,
    STORE_CONNECT_TIMEOUT,
    STORE_READ_TIMEOUT,
    STORE_URL_EXPIRY,
    Download,
)
from proxy.fetch.fleet import Fleet
from proxy.fetch.spool import Spool, chunks, taken
from proxy.fetch.upstream import RETRY_STATUSES, USER_AGENT, Upstream, error_code
from storage.base import BlobWriter
from storage.content import ContentStore
from storage.errors import DigestMismatch
from storage.writer import SpoolWriter

if TYPE_CHECKING:
    from proxy.core.metrics import Metrics
    from storage.redis import RedisCoordinator

log = logging.getLogger(__name__)


class Downloads:
    """The coalescing map: one running :class:`Download` per digest, and the tasks behind them."""

    def __init__(
        self,
        store: ContentStore,
        *,
        metrics: Metrics | None = None,
        advertise_url: str | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.advertise_url = advertise_url
        #: Cross-replica single flight (Redis); None: this process only.
        self.coordinator: RedisCoordinator | None = None
        self.peer_token: str | None = None
        self.fleet = Fleet(self)
        self.running: dict[str, Download] = {}
        #: Until then (monotonic) blobs held only in the object store are read through the S3
        #: API, not from presigned URLs (one was refused).
        self.presigned_off_until = 0.0
        self._tasks: dict[asyncio.Task[None], Download] = {}

    def __len__(self) -> int:
        return len(self.running)

    async def drain(self, seconds: float) -> None:
        """Stopping (SIGTERM): let the downloads in flight finish for up to ``seconds``
        (peers and clients are still served meanwhile), then hand the rest over to the fleet:
        the locks this replica holds are deleted before its downloads stop, so the replicas
        following them take over at once (``proxy.fetch.fleet``)."""
        deadline = time.monotonic() + seconds
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            log.info("draining: waiting for %d downloads (%.0f s left)", len(self._tasks), left)
            await asyncio.wait(list(self._tasks), timeout=left)
        unfinished = [(task, dl) for task, dl in self._tasks.items() if not dl.verified]
        if not unfinished:
            return
        coordinator = self.coordinator
        handed = [dl.digest for _, dl in unfinished if dl.digest in self.fleet.owned]
        if coordinator is not None:
            for digest in handed:
                await coordinator.release(digest)
        log.warning(
            "draining: %d downloads unfinished after %.0f s, %d handed over to other replicas",
            len(unfinished),
            seconds,
            len(handed),
        )
        for task, _ in unfinished:
            task.cancel()
        await asyncio.gather(*(task for task, _ in unfinished), return_exceptions=True)

    async def close(self) -> None:
        # Clients of a verified download have their bytes already: let it become durable (the
        # fsync and rename, the upload's completion) rather than lose it to a restart.
        publishing = [task for task, dl in self._tasks.items() if dl.verified]
        if publishing:
            await asyncio.wait(publishing, timeout=PUBLISH_GRACE)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fleet.close()
        threadget.POOL.close()

    def get(self, upstream: Upstream, repository: str, digest: str, *, stored: bool) -> Download:
        """The download in flight for ``digest``, or a new one (``stored``: the store has it)."""
        current = self.running.get(digest)
        if current is not None and not current.done:
            return current
        # A failed one is `done` at once, so the next request starts afresh even while the old
        # task unwinds.
        dl = Download(digest, upstream, repository, source="store" if stored else "upstream")
        self.running[digest] = dl
        task = asyncio.ensure_future(self._run(dl))
        self._tasks[task] = dl
        task.add_done_callback(self._forget)
        return dl

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _run(self, dl: Download) -> None:
        try:
            if dl.source == "store":
                await self.from_store(dl)
            elif self.coordinator is None:
                await self.from_upstream(dl)
            else:
                await self.fleet.run(dl, self.coordinator)
        except asyncio.CancelledError:
            dl.fail(UpstreamUnreachable("download cancelled", upstream=dl.upstream.name))
            raise
        except (UpstreamError, StorageError) as exc:
            log.warning(
                "blob download failed digest=%s source=%s upstream=%s error=%s",
                dl.digest,
                dl.source,
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
            if self.running.get(dl.digest) is dl:
                del self.running[dl.digest]

    async def commit(self, dl: Download) -> None:
        assert dl.writer is not None

        def verified() -> None:
            dl.verified = True
            dl.notify()

        try:
            await dl.writer.commit(dl.digest, dl.size, verified=verified)
        except DigestMismatch as exc:
            raise UpstreamContentError(str(exc), upstream=dl.upstream.name) from exc
        dl.committed = True
        dl.notify()
        # served: recent for eviction (the object store's own mtime has 1 s resolution)
        self.store.accessed("blobs", dl.digest)

    # -- from upstream -------------------------------------------------------------------------

    async def from_upstream(self, dl: Download) -> None:
        upstream = dl.upstream
        path = f"/v2/{dl.repository}/blobs/{dl.digest}"
        scope = f"repository:{dl.repository}:pull"
        resumes = 0  # consecutive attempts that brought no new byte
        progress = -1
        while True:
            # The blob's own bytes: a content-coded answer would never match its digest.
            headers = {"Accept-Encoding": "identity"}
            if dl.written:
                headers["Range"] = f"bytes={dl.written}-"
            try:
                if not await self._fetch_in_thread(dl, path, scope, headers):
                    async with upstream.request(
                        "GET", path, scope=scope, headers=headers, expect=(200, 206)
                    ) as resp:
                        skip = self._start_or_resume(
                            dl, resp.status, resp.content_length, resp.headers
                        )
                        await self._read_body(dl, resp, skip)
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
                        f"blob download broke: {exc}", upstream=upstream.name
                    ) from exc
                log.info(
                    "resuming blob download digest=%s offset=%d attempt=%d",
                    dl.digest,
                    dl.written,
                    resumes,
                )
        await self.commit(dl)
        log.debug("blob cached digest=%s size=%d", dl.digest, dl.written)
        self.store.committed(dl.digest, dl.written)

    async def _read_body(self, dl: Download, resp: aiohttp.ClientResponse, skip: int) -> None:
        """Append the response's body (but its first ``skip`` bytes) to the download."""
        upstream = dl.upstream
        counter = (
            None if self.metrics is None else self.metrics.upstream_bytes.labels(upstream.name)
        )
        spool = Spool(dl)
        try:
            async for chunk in chunks(resp.content):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                await spool.add(chunk)
                if counter is not None:
                    counter.inc(len(chunk))
            await spool.flush()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            await spool.flush()  # what did arrive is good: resume after it
            raise
        finally:
            spool.discard()

    def _counter(self, dl: Download, *, upstream: bool = True) -> Callable[[int], None]:
        """What a body copy calls with each count of bytes appended to ``dl`` (``upstream``:
        they are counted as bytes from upstream too)."""
        counter = (
            None
            if self.metrics is None or not upstream
            else self.metrics.upstream_bytes.labels(dl.upstream.name)
        )

        def count(n: int) -> None:
            dl.written += n
            dl.notify()
            if counter is not None:
                counter.inc(n)

        return count

    async def _copytaken(
        self, dl: Download, taken: rawbody.Taken, count: Callable[[int], None]
    ) -> None:
        """Copy a body read by a worker thread into the download's writer."""
        upstream = dl.upstream
        assert isinstance(dl.writer, SpoolWriter)
        copy = rawbody.BodyCopy(taken, dl.writer, count, upstream.config.read_timeout)
        try:
            if dl.size is not None and dl.written + taken.size > dl.size:
                raise UpstreamContentError(
                    "upstream sent more bytes than announced", upstream=upstream.name
                )
            await copy.run()
        except OSError as exc:  # cut short, reset, silent for read_timeout (TimeoutError)
            raise UpstreamUnreachable(
                f"blob body read failed: {type(exc).__name__}", upstream=upstream.name
            ) from exc
        finally:
            copy.close()

    async def _fetch_in_thread(
        self, dl: Download, path: str, scope: str, headers: dict[str, str]
    ) -> bool:
        """GET the blob on a worker thread's connection (``proxy.fetch.threadget``); False when the
        caller must make the request through aiohttp (a 5xx to retry with back-off, a chunked
        body, no thread free, an upstream reached through a proxy)."""
        if dl.writer is not None and not isinstance(dl.writer, SpoolWriter):
            return False
        if threadget.env_proxy(str(dl.upstream.url_for(path))) is not None:
            return False
        if not rawbody.claim():
            return False
        try:
            return await self._fetch_claimed(dl, path, scope, headers)
        finally:
            rawbody.release()

    async def _fetch_claimed(
        self, dl: Download, path: str, scope: str, headers: dict[str, str]
    ) -> bool:
        upstream = dl.upstream
        upstream.check_backoff()
        config = upstream.config
        for attempt in range(2):
            sent = dict(headers)
            auth = upstream.auth_header(scope)
            if auth:
                sent["Authorization"] = auth
            try:
                resp = await threadget.get_async(
                    str(upstream.url_for(path)),
                    sent,
                    auth_origin=threadget.origin_of(str(upstream.base)),
                    connect_timeout=config.connect_timeout,
                    read_timeout=config.read_timeout,
                    user_agent=USER_AGENT,
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                log.debug("threaded blob GET failed, retrying through aiohttp error=%r", exc)
                return False
            for status in resp.statuses:
                upstream.count("GET", str(status))
            upstream.observe(resp.headers)
            if resp.status != 401 or attempt:
                break
            # The first blob of a repository before any token: take up the challenge here.
            if not await upstream.authorize(scope, resp.headers.get("WWW-Authenticate", "")):
                return False
        if resp.status not in (200, 206):
            if resp.status in RETRY_STATUSES or resp.status == 401:
                return False  # Upstream.request asks again, with back-off, and raises
            code = error_code(resp.error_body) if resp.error_body is not None else None
            upstream.raise_for(resp.status, resp.headers, resp.url, code)
        if not resp.plain_body:
            resp.conn.close()  # chunked or encoded: left to aiohttp's reader
            return False
        length = resp.content_length
        assert length is not None
        try:
            skip = self._start_or_resume(dl, resp.status, length, resp.headers)
        except BaseException:
            resp.conn.close()
            raise
        if skip or not isinstance(dl.writer, SpoolWriter):
            resp.conn.close()  # a 200 to a Range request: rare, left to aiohttp's reader
            return False
        await self._copytaken(dl, taken(resp, length), self._counter(dl))
        return True

    def _start_or_resume(
        self, dl: Download, status: int, length: int | None, headers: Mapping[str, str]
    ) -> int:
        """Check the response against what we have; return how many leading bytes to skip."""
        if dl.writer is None:
            if status == 206:
                raise UpstreamContentError("unrequested partial content", upstream=dl.upstream.name)
            dl.begin(self.store.blob_writer(dl.digest), length)
            return 0
        if status == 206:
            content_range = headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {dl.written}-"):
                raise UpstreamContentError(
                    "upstream resumed at the wrong offset", upstream=dl.upstream.name
                )
            return 0
        # 200 to a Range request: the upstream cannot resume; skip what we already have.
        if dl.size is not None and length not in (None, dl.size):
            raise UpstreamContentError("blob size changed on resume", upstream=dl.upstream.name)
        return dl.written

    # -- from the store (fill the local tier) --------------------------------------------------

    async def from_store(self, dl: Download) -> None:
        # A download that had bytes from a peer goes on after them, into the same writer.
        offset = dl.written
        local = self.store.local_blob(dl.digest)
        if local is not None and dl.writer is None:  # the filesystem store: all of it is local
            dl.size = dl.written = local.size
            dl.committed = True
            if not dl.started.done():
                dl.started.set_result(None)
            dl.notify()
            return
        size = await self.store.stat_blob(dl.digest)
        if size is not None and dl.writer is None:
            await self._store_in_thread(dl, size)
        if size is None or dl.written < size:
            # No presigned read, or it stopped short: the rest through the store's own client.
            stream = None if size is None else await self.store.read_blob(dl.digest, dl.written)
            if stream is None:
                if dl.writer is not None:
                    raise StorageError("blob left the object store while read", op="read")
                # Evicted since the caller looked: fetch it like any miss.
                dl.source = "upstream"
                if self.coordinator is None:
                    await self.from_upstream(dl)
                else:
                    await self.fleet.run(dl, self.coordinator)
                return
            if dl.writer is None:
                dl.begin(self._tier_writer(dl), size)
            spool = Spool(dl)
            try:
                async for chunk in stream:
                    await spool.add(chunk)
                await spool.flush()
            finally:
                spool.discard()
        try:
            await self.commit(dl)
        except UpstreamContentError:
            if offset:
                raise  # which part was wrong, the peer's or the store's, is not known
            # The object store holds bytes that are not this digest: never serve them again.
            log.error("stored blob does not match its digest, deleting it digest=%s", dl.digest)
            await self.store.delete_blob(dl.digest)
            raise

    def _presigned_off(self, why: str) -> None:
        """Read blobs through the S3 API for a while: presigned reads would fail again."""
        self.presigned_off_until = time.monotonic() + PRESIGNED_OFF_FOR
        log.warning("%s: reading blobs through the S3 API for %.0f s", why, PRESIGNED_OFF_FOR)

    def _tier_writer(self, dl: Download) -> BlobWriter:
        writer = self.store.tier_writer(dl.digest)
        if writer is None:
            raise StorageError("blob is neither local nor remote", op="read")
        return writer

    async def _store_in_thread(self, dl: Download, size: int) -> None:
        """Read the stored blob as a blob from upstream is read: a plain GET of a presigned URL
        of it (S3) on a worker thread's connection, copied by :class:`proxy.fetch.rawbody.BodyCopy`.

        Through the S3 client (aiohttp on the event loop) a 1 GiB blob held in the bucket only
        came at a third of distribution's speed. This stops short, leaving the rest to
        :meth:`storage.content.ContentStore.read_blob`, when the store has no URLs, no copy
        slot is free, the store is reached through a proxy, or the GET fails or breaks; the
        tier writer verifies the digest either way.
        """
        if time.monotonic() < self.presigned_off_until or not rawbody.claim():
            return
        try:
            try:
                url = await self.store.blob_url(dl.digest, STORE_URL_EXPIRY)
            except Exception as exc:  # no credentials to sign with: the S3 API will say so
                log.debug("cannot presign a blob read error=%r", exc)
                return
            if url is None or threadget.env_proxy(url) is not None:
                return
            started = time.perf_counter()
            try:
                resp = await threadget.get_async(
                    url,
                    {"Accept-Encoding": "identity"},
                    auth_origin=threadget.origin_of(url),
                    connect_timeout=STORE_CONNECT_TIMEOUT,
                    read_timeout=STORE_READ_TIMEOUT,
                    user_agent=USER_AGENT,
                )
            except (OSError, ValueError) as exc:
                self.store.observed("read", "error", time.perf_counter() - started)
                if isinstance(exc, ssl.SSLCertVerificationError):
                    # botocore trusts AWS_CA_BUNDLE; this GET, like aiohttp, SSL_CERT_FILE
                    self._presigned_off(f"the store's certificate is not trusted ({exc})")
                else:
                    log.info("presigned read failed, reading through the S3 API error=%r", exc)
                return
            status = resp.status
            self.store.observed(
                "read",
                "ok" if status == 200 else "not_found" if status == 404 else "error",
                time.perf_counter() - started,
            )
            if status != 200 or not resp.plain_body or resp.content_length != size:
                resp.release(status != 200 and resp.error_body is not None)  # read: reusable
                if status in (400, 403):
                    # Refused rather than failed (a proxy rewriting Host, a policy denying
                    # presigned requests, a skewed clock).
                    self._presigned_off(f"the object store refused a presigned read ({status})")
                return
            dl.begin(self._tier_writer(dl), size)
            try:
                await self._copytaken(dl, taken(resp, size), self._counter(dl, upstream=False))
            except UpstreamUnreachable as exc:  # cut short: the rest through the S3 API
                log.info(
                    "presigned read broke, resuming through the S3 API digest=%s offset=%d "
                    "error=%s",
                    dl.digest,
                    dl.written,
                    exc,
                )
        finally:
            rawbody.release()
