"""One fetch per blob, shared by every client that wants it: the :class:`Download` record and the
vocabulary around it (:class:`Cache` results, sizes, the peer header).

The machine that fills downloads is :class:`proxy.fetch.downloads.Downloads`; across replicas,
:mod:`proxy.fetch.fleet`; clients follow a download with ``proxy.cache.blobs.stream_download``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.fetch.upstream import Upstream
from storage.base import BlobWriter

CHUNK = 256 * 1024
#: Bytes read ahead while the previous batch is hashed and written in a worker thread; reading
#: waits when this much is queued (so memory stays flat however fast upstream is).
BATCH_MAX = 4 * 1024 * 1024
#: Upstream reconnects (with ``Range``) in a row that bring no new byte before giving up.
MAX_RESUMES = 5
#: Seconds a shutdown waits for verified downloads to be published.
PUBLISH_GRACE = 30.0
#: A blob held only in the object store is read from a presigned URL this long-lived (it is
#: checked when the GET starts), with these timeouts (the S3 client's own).
STORE_URL_EXPIRY = 300.0
STORE_CONNECT_TIMEOUT = 5.0
STORE_READ_TIMEOUT = 30.0
#: After the store refused a presigned read (or its certificate was not trusted for one), blobs
#: are read through the S3 API this long.
PRESIGNED_OFF_FOR = 600.0
#: The header that carries the fleet's shared secret on peer requests.
PEER_HEADER = "X-Regproxy-Peer"
PEER_PATH = "/_regproxy/peer/blobs/"


class Cache(StrEnum):
    """How a request was answered: the one typed result the access log and metrics read."""

    HIT = "HIT"  # from the cache (local file, object store, or a redirect to it)
    MISS = "MISS"  # streamed while a download fills the cache
    UNCACHED = "UNCACHED"  # relayed from upstream, verified, because the cache could not take it
    ABORTED = "ABORTED"  # cut short: the download failed verification or broke
    CLIENT_GONE = "CLIENT_GONE"  # the client left; the download goes on

    @property
    def header(self) -> str:
        return "MISS" if self in (Cache.UNCACHED, Cache.CLIENT_GONE) else self.value


#: ``request[CACHE_RESULT]`` holds a :class:`Cache` once a blob answer is decided.
CACHE_RESULT = "cache"


@dataclass(eq=False)
class Download:
    """One fetch of one blob, shared by every client that wants it."""

    digest: str
    upstream: Upstream
    repository: str
    #: ``upstream`` | ``store`` | ``peer``.
    source: str = "upstream"
    #: Total size when known (Content-Length, the store's size).
    size: int | None = None
    #: Bytes in the local file so far.
    written: int = 0
    #: Size and digest checked: every byte in the local file may go out, even if making it
    #: durable (the fsync and rename, the S3 upload's completion) is still under way or fails.
    verified: bool = False
    committed: bool = False
    error: BaseException | None = None
    writer: BlobWriter | None = None
    started: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    @property
    def path(self) -> object:
        """The local file holding the bytes (the spool, then the committed file if local)."""
        return None if self.writer is None else self.writer.path

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self) -> None:
        await self._changed.wait()

    def begin(self, writer: BlobWriter, size: int | None) -> None:
        self.writer, self.size = writer, size
        if size:
            writer.reserve(size)
        if not self.started.done():
            self.started.set_result(None)
        self.notify()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # retrieved here; each waiter re-raises it
        self.notify()

    async def wait_done(self) -> None:
        while not self.done:
            await self.wait_change()
