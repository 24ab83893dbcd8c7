"""One upstream GET per blob across replicas that share Redis, and hand-over when a replica dies.

The replica that takes a blob's lock (:class:`storage.redis.RedisCoordinator`) fetches it from
upstream; the lock's value says where it can be reached. Every other replica that wants the blob
follows it as a peer, streaming its download over HTTP (``/_regproxy/peer/blobs/<digest>``, the
fleet's secret in ``X-Regproxy-Peer``) into its own writer, which hashes every byte it appends
just as a download from upstream does; or it reads the committed blob from the shared store.

Hand-over. The owner renews its lock every 1.5 s; unrenewed, it expires after 6 s. When a
follower's stream from the owner breaks (the owner was killed, stopped, or cut off; a read
silent for ``PEER_READ_TIMEOUT``), the follower keeps its clients' responses open and asks the
owner again from the byte it has (``Range``):

* the owner answers: it is alive (a blip): the stream goes on from there;
* the owner's address refuses the connection, or the owner no longer has the download (a
  restarted process on the same address): it is gone, and the follower deletes that owner's
  lock at once (only that value: never a newer owner's);
* the stream fell silent, or the owner is unreachable (a network cut, a frozen process, a name
  that does not resolve): the follower watches the owner's lock; renewed, the owner is alive
  and is asked again; expired (6 s after the owner's last renewal), it is gone.

Once the lock is free, every follower races for it. The winner makes its writer durable (with
S3 it starts uploading the parts it already has), resumes from upstream with
``Range: bytes=<what it has>-``, its lock naming it as the new owner; the others follow the
new owner from their own offsets, or read the committed blob from the store. So a replica's
death costs one more upstream GET for the blob fleet-wide (a resume, not the whole blob), and
the clients of the other replicas get every byte, verified, without a cut: after SIGKILL within
about a second, after a network cut within about 6-7 s. What it does not promise: the dead
replica's own clients are cut (their connection was to it); two owners at once if Redis loses
the lock (Redis failed over, or was unreachable from the owner for 6 s): then two GETs, and each
replica's bytes are still verified on their own; a replica that is alive but unreachable by its
peers while it still reaches Redis is waited for (its followers read the blob from the store
once it is committed, and fail their clients after ``FOLLOW_STALL`` without a byte) and never
taken over.

A SIGTERM'd replica (``Downloads.drain``) first lets its downloads finish for up to its drain
timeout, still serving peers; then it hands the rest over: it deletes its locks before it stops
its downloads, so its followers take over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

import aiohttp

from proxy.core.errors import UpstreamContentError, UpstreamStatus, UpstreamUnreachable
from proxy.fetch.download import PEER_HEADER, PEER_PATH, Download
from proxy.fetch.spool import Spool, chunks
from storage.content import ContentStore
from storage.redis import BLOB_LOCK_RENEW, BLOB_LOCK_TTL_MS

if TYPE_CHECKING:
    from storage.redis import BlobLock, RedisCoordinator

log = logging.getLogger(__name__)

#: Seconds a peer stream may stay silent before the follower asks the owner again.
PEER_READ_TIMEOUT = 5.0
PEER_CONNECT_TIMEOUT = 2.0
#: Seconds between renewals of an owned lock, and how long it lives without them.
LOCK_RENEW = BLOB_LOCK_RENEW
LOCK_TTL = BLOB_LOCK_TTL_MS / 1000
#: A follower gives up when no byte came for this long (no owner, no store, no lock to take).
FOLLOW_STALL = 60.0


class Sources(Protocol):
    """What the fleet needs of this replica's downloads: where bytes come from, and commit."""

    store: ContentStore
    advertise_url: str | None
    peer_token: str | None

    async def from_upstream(self, dl: Download) -> None: ...

    async def from_store(self, dl: Download) -> None: ...

    async def commit(self, dl: Download) -> None: ...


class PeerGone(Exception):
    """The owner's address refuses connections, or it no longer downloads the blob."""


class Fleet:
    """Coordinates one replica's downloads with the fleet's through a :class:`RedisCoordinator`."""

    def __init__(self, downloads: Sources) -> None:
        self.downloads = downloads
        self.session: aiohttp.ClientSession | None = None
        #: Digests whose lock this replica holds (what a drain hands over).
        self.owned: set[str] = set()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def run(self, dl: Download, coordinator: RedisCoordinator) -> None:
        """Fetch it ourselves if no other replica is, else follow the replica that is; take it
        over (with the bytes we have) when that replica goes away."""
        confirmed = False
        progress, since = -1, time.monotonic()
        while True:
            if dl.written > progress:
                progress, since = dl.written, time.monotonic()
            elif time.monotonic() - since > FOLLOW_STALL:
                raise UpstreamUnreachable(
                    "no replica makes progress with this blob", upstream=dl.upstream.name
                )
            owned = await coordinator.acquire(
                dl.digest, self.downloads.advertise_url or "", dl.upstream.name, dl.repository
            )
            if owned is None:  # Redis is away: per-replica behaviour
                await self._fetch(dl)
                return
            if owned:
                await self._own(dl, coordinator)
                return
            if not confirmed:
                await self._confirm_before_following(dl, coordinator)
                confirmed = True
            if await self._follow(dl, coordinator):
                return
            # the owner is gone and its lock free: race for it

    async def _own(self, dl: Download, coordinator: RedisCoordinator) -> None:
        self.owned.add(dl.digest)
        renewer = asyncio.create_task(self._keep_lock(dl, coordinator))
        try:
            await self._fetch(dl)
        finally:
            renewer.cancel()
            self.owned.discard(dl.digest)
            await coordinator.release(dl.digest)

    async def _fetch(self, dl: Download) -> None:
        """From the store if it was committed meanwhile, else from upstream (resuming after
        the bytes this replica has, if it followed a replica that went away)."""
        store = self.downloads.store
        if await store.stat_blob(dl.digest) is not None:
            dl.source = "store"  # committed by a replica just before we locked
            await self.downloads.from_store(dl)
            return
        if dl.writer is not None:
            log.info(
                "taking over a blob download from a replica that went away digest=%s offset=%d",
                dl.digest,
                dl.written,
            )
            await dl.writer.make_durable()
        dl.source = "upstream"  # other replicas may follow this one now
        await self.downloads.from_upstream(dl)

    async def _confirm_before_following(self, dl: Download, coordinator: RedisCoordinator) -> None:
        """Another replica fetches it, maybe for another repository: ours must hold it too."""
        info = await coordinator.inflight(dl.digest)
        if info is not None and (info.upstream, info.repository) == (
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
        while True:
            await asyncio.sleep(LOCK_RENEW)
            if not await coordinator.refresh(dl.digest):
                # Expired (Redis unreachable for its whole TTL) or declared dead by a peer: the
                # download goes on for this replica's clients, but others no longer follow it.
                log.warning("lost the lock of a blob download digest=%s", dl.digest)
                self.owned.discard(dl.digest)
                return

    async def _follow(self, dl: Download, coordinator: RedisCoordinator) -> bool:
        """Follow the owner's download: stream it from the owner, or read the committed blob.

        True once the blob is committed here; False when the lock is free (the caller races
        for it). Raises only when the bytes are wrong or this replica's store fails.
        """
        since = time.monotonic()
        written = dl.written
        while True:
            if dl.written > written:
                written, since = dl.written, time.monotonic()
            elif time.monotonic() - since > FOLLOW_STALL:
                return False
            if await self.downloads.store.stat_blob(dl.digest) is not None:
                await self._rest_from_store(dl)
                return True
            lock = await coordinator.inflight(dl.digest)
            if lock is None:
                if await self.downloads.store.stat_blob(dl.digest) is not None:
                    continue  # committed just now: the next turn reads it
                return False
            url = lock.url
            if url and url == self.downloads.advertise_url and lock.owner != coordinator.instance:
                # Held by an earlier process at this very address, which is no more.
                await coordinator.release_dead(dl.digest, lock)
                continue
            if url and url != self.downloads.advertise_url and self.downloads.peer_token:
                try:
                    await self._from_peer(dl, url)
                    return True
                except PeerGone as exc:
                    if await coordinator.release_dead(dl.digest, lock):
                        log.info(
                            "the replica downloading a blob is gone, taking over digest=%s "
                            "owner=%s offset=%d why=%s",
                            dl.digest,
                            lock.owner,
                            dl.written,
                            exc,
                        )
                    continue
                except (UpstreamStatus, aiohttp.ClientError, TimeoutError) as exc:
                    log.info(
                        "peer stream broke digest=%s owner=%s offset=%d error=%r",
                        dl.digest,
                        lock.owner,
                        dl.written,
                        exc,
                    )
                    silent = isinstance(exc, TimeoutError | aiohttp.ClientConnectorError)
                    if silent and not await self._renewed(dl, coordinator, lock):
                        continue  # silent or unreachable, and its lock gone: race for it
                    # broken, or silent but alive: the next turn asks the owner again
            await asyncio.sleep(0.05)

    async def _renewed(self, dl: Download, coordinator: RedisCoordinator, lock: BlobLock) -> bool:
        """After the owner's stream fell silent: True once the owner renews its lock (it is
        alive: ask it again), False once the lock is gone or another replica's (it expired: the
        owner is cut off or frozen)."""
        last = await coordinator.lock_ttl(dl.digest)
        deadline = time.monotonic() + LOCK_TTL + 1.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            current = await coordinator.inflight(dl.digest)
            if current is None or current.raw != lock.raw:
                return False
            ttl = await coordinator.lock_ttl(dl.digest)
            if ttl is not None and last is not None and ttl > last:
                return True
            last = ttl
        return True

    async def _rest_from_store(self, dl: Download) -> None:
        """Another replica committed the blob: read it (after the bytes we have) from the store."""
        if dl.writer is not None:
            log.info(
                "reading the rest of a blob from the store digest=%s offset=%d",
                dl.digest,
                dl.written,
            )
        dl.source = "store"
        await self.downloads.from_store(dl)

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    sock_connect=PEER_CONNECT_TIMEOUT, sock_read=PEER_READ_TIMEOUT
                )
            )
        return self.session

    async def _from_peer(self, dl: Download, url: str) -> None:
        """Stream the owner's download from ``url`` into ours, from the bytes we have on."""
        headers = {PEER_HEADER: self.downloads.peer_token or ""}
        offset = dl.written
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with self._session().get(
                f"{url.rstrip('/')}{PEER_PATH}{dl.digest}", headers=headers, ssl=False
            ) as resp:
                await self._read_peer(dl, resp, offset)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):  # nothing listens there now
                raise PeerGone("connection refused") from exc
            raise  # unreachable, a name that does not resolve: maybe a passing network fault
        if dl.size is not None and dl.written != dl.size:
            raise UpstreamUnreachable("peer stream ended early", upstream=dl.upstream.name)
        await self.downloads.commit(dl)

    async def _read_peer(self, dl: Download, resp: aiohttp.ClientResponse, offset: int) -> None:
        if resp.status == 404:
            raise PeerGone("the peer has no such download")
        size = resp.content_length
        skip = 0
        if resp.status == 206 and offset:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise UpstreamContentError(
                    "peer resumed at the wrong offset", upstream=dl.upstream.name
                )
            total = content_range.rpartition("/")[2]
            size = int(total) if total.isdigit() else None
        elif resp.status == 200:
            skip = offset  # the whole blob: skip what we have
        else:
            raise UpstreamStatus("peer refused", upstream=dl.upstream.name, status=resp.status)
        if dl.writer is None:
            store = self.downloads.store
            dl.source = "peer"
            dl.begin(store.tier_writer(dl.digest) or store.blob_writer(dl.digest), size)
        elif size is not None and dl.size not in (None, size):
            raise UpstreamContentError("peer announced another size", upstream=dl.upstream.name)
        elif dl.size is None:
            dl.size = size
        dl.source = "peer"
        spool = Spool(dl)
        try:
            async for chunk in chunks(resp.content):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                await spool.add(chunk)
            await spool.flush()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            await spool.flush()  # what did arrive is good: go on after it
            raise
        finally:
            spool.discard()
