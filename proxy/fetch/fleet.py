"""One upstream GET per blob across replicas that share Redis: the replica that takes the blob's
lock fetches it; the others follow it as peers, streaming its download over HTTP
(``/_regproxy/peer/blobs/<digest>``, the fleet's secret in ``X-Regproxy-Peer``) or reading the
committed blob from the shared store.

What this does not promise: if the owner dies mid-blob its followers' clients get a cut
connection (as from any failed download); the lock expires after 30 s without refresh, and the
next request fetches it afresh.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

import aiohttp

from proxy.core.errors import UpstreamStatus, UpstreamUnreachable
from proxy.fetch.download import PEER_HEADER, PEER_PATH, Download
from proxy.fetch.spool import Spool, chunks
from storage.content import ContentStore

if TYPE_CHECKING:
    from storage.redis import RedisCoordinator

log = logging.getLogger(__name__)


class Sources(Protocol):
    """What the fleet needs of this replica's downloads: where bytes come from, and commit."""

    store: ContentStore
    advertise_url: str | None
    peer_token: str | None

    async def from_upstream(self, dl: Download) -> None: ...

    async def from_store(self, dl: Download) -> None: ...

    async def commit(self, dl: Download) -> None: ...


class Fleet:
    """Coordinates one replica's downloads with the fleet's through a :class:`RedisCoordinator`."""

    def __init__(self, downloads: Sources) -> None:
        self.downloads = downloads
        self.session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def run(self, dl: Download, coordinator: RedisCoordinator) -> None:
        """Fetch it ourselves if no other replica is, else follow the replica that is."""
        for _ in range(3):
            owned = await coordinator.acquire(dl.digest)
            if owned is None:  # Redis is away: per-replica behaviour
                await self.downloads.from_upstream(dl)
                return
            if owned:
                refresher = asyncio.create_task(self._keep_lock(dl, coordinator))
                try:
                    if await self.downloads.store.stat_blob(dl.digest) is not None:
                        dl.source = "store"  # committed by a replica just before we locked
                        await self.downloads.from_store(dl)
                    else:
                        await self.downloads.from_upstream(dl)
                finally:
                    refresher.cancel()
                    await coordinator.release(dl.digest)
                return
            await self._confirm_before_following(dl, coordinator)
            if await self._follow(dl, coordinator):
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
        await coordinator.publish(
            dl.digest, self.downloads.advertise_url or "", dl.size, dl.upstream.name, dl.repository
        )
        while True:
            await asyncio.sleep(5.0)
            await coordinator.refresh(dl.digest)

    async def _follow(self, dl: Download, coordinator: RedisCoordinator) -> bool:
        """Wait for the owner's download: stream it from the owner, or read the committed blob.

        False if the owner vanished without committing (the caller then tries to own it).
        """
        for _ in range(600):  # 30 s at 50 ms: as long as a lock lives without refresh
            if await self.downloads.store.stat_blob(dl.digest) is not None:
                dl.source = "store"
                await self.downloads.from_store(dl)
                return True
            info = await coordinator.inflight(dl.digest)
            url = (info or {}).get("url")
            if url and url != self.downloads.advertise_url and self.downloads.peer_token:
                dl.source = "peer"
                try:
                    await self._from_peer(dl, str(url))
                    return True
                except (
                    UpstreamUnreachable,
                    UpstreamStatus,
                    aiohttp.ClientError,
                    TimeoutError,
                ) as exc:
                    if dl.writer is not None:  # bytes already went to clients: fail them
                        raise UpstreamUnreachable(
                            f"peer download broke: {type(exc).__name__}", upstream=dl.upstream.name
                        ) from exc
                    log.info("peer not reachable, waiting digest=%s error=%s", dl.digest, exc)
            if not await coordinator.locked(dl.digest):
                if await self.downloads.store.stat_blob(dl.digest) is not None:
                    continue  # committed just now: the next turn reads it
                return False
            await asyncio.sleep(0.05)
        return False

    async def _from_peer(self, dl: Download, url: str) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=60)
            )
        headers = {PEER_HEADER: self.downloads.peer_token or ""}
        async with self.session.get(
            f"{url.rstrip('/')}{PEER_PATH}{dl.digest}", headers=headers, ssl=False
        ) as resp:
            if resp.status != 200:
                raise UpstreamStatus("peer refused", upstream=dl.upstream.name, status=resp.status)
            store = self.downloads.store
            writer = store.tier_writer(dl.digest) or store.blob_writer(dl.digest)
            dl.begin(writer, resp.content_length)
            spool = Spool(dl)
            try:
                async for chunk in chunks(resp.content):
                    await spool.add(chunk)
                await spool.flush()
            finally:
                spool.discard()
        if dl.size is not None and dl.written != dl.size:
            raise UpstreamUnreachable("peer stream ended early", upstream=dl.upstream.name)
        await self.downloads.commit(dl)
