"""Which repository may see which content: a digest is served under repository R only once R is
known to hold it.

Blobs and manifests are stored once, by digest, for every repository; without this check anyone
who knows (or guesses) the digest of a layer fetched for a private repository could read it under
a public one. A digest counts as R's ("linked") when

* a manifest served under R references it (an index's children, a manifest's config and layers;
  the manifest's own digest too), or
* upstream confirms it: a HEAD of the digest under R answers 200 (done at most once, then
  linked), or
* it is fetched from upstream under R in the first place.

Otherwise the client gets ``BLOB_UNKNOWN`` / ``MANIFEST_UNKNOWN``, as if it were not cached.
Links are records in the metadata store (``_links/<digest>``), shared by replicas with Redis.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from cachetools import LRUCache

from proxy.cache.manifests import Manifest
from proxy.core.errors import (
    BlobUnknown,
    ManifestUnknown,
    StorageError,
    UpstreamError,
    UpstreamStatus,
)
from proxy.core.media import ACCEPT_MANIFESTS
from proxy.core.singleflight import SingleFlight
from proxy.fetch.upstream import Upstream
from storage.base import MetadataStore

log = logging.getLogger(__name__)


def references(data: bytes) -> list[str]:
    """Digests a manifest or index document points at."""
    try:
        doc: Any = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    found = []
    for item in [
        *(doc.get("manifests") or []),
        doc.get("config") or {},
        *(doc.get("layers") or []),
    ]:
        if isinstance(item, dict) and isinstance(item.get("digest"), str):
            found.append(item["digest"])
    return found


class Links:
    def __init__(self, meta: MetadataStore, *, offline: bool = False) -> None:
        self.meta = meta
        self.offline = offline
        self._known: LRUCache[tuple[str, str, str], bool] = LRUCache(maxsize=200_000)
        self._confirmations: SingleFlight[tuple[str, str, str, str], bool] = SingleFlight()

    async def link(self, upstream: str, repository: str, digests: Iterable[str]) -> None:
        for digest in digests:
            key = (upstream, repository, digest)
            if key in self._known:
                continue
            # Known in this process even if the disk cannot keep it (logged and counted there).
            with contextlib.suppress(StorageError):
                await self.meta.set_record(upstream, repository, "links", digest, b"1")
            self._known[key] = True

    async def link_manifest(self, upstream: str, repository: str, manifest: Manifest) -> None:
        digests = [manifest.digest]
        if manifest.data is not None and (upstream, repository, f"refs:{manifest.digest}") not in (
            self._known
        ):
            digests += references(manifest.data)
            self._known[(upstream, repository, f"refs:{manifest.digest}")] = True
        await self.link(upstream, repository, digests)

    async def linked(self, upstream: str, repository: str, digest: str) -> bool:
        key = (upstream, repository, digest)
        if key in self._known:
            return True
        if await self.meta.get_record(upstream, repository, "links", digest) is not None:
            self._known[key] = True
            return True
        return False

    async def confirm(
        self,
        upstream: Upstream,
        repository: str,
        digest: str,
        kind: str,
        *,
        as_repo: str,
        as_upstream: str,
    ) -> None:
        """Ask upstream whether ``repository`` holds ``digest``; link it or raise *_UNKNOWN."""
        ok = not self.offline and await self._confirmations.run(
            (upstream.name, repository, digest, kind),
            lambda: self._ask(upstream, repository, digest, kind),
        )
        if not ok:
            error = BlobUnknown if kind == "blobs" else ManifestUnknown
            raise error({"digest": digest})
        await self.link(as_upstream, as_repo, [digest])

    async def _ask(self, upstream: Upstream, repository: str, digest: str, kind: str) -> bool:
        headers = {"Accept": ACCEPT_MANIFESTS} if kind == "manifests" else {}
        try:
            async with upstream.request(
                "HEAD",
                f"/v2/{repository}/{kind}/{digest}",
                scope=f"repository:{repository}:pull",
                headers=headers,
            ) as resp:
                return resp.headers.get("Docker-Content-Digest", digest) == digest
        except UpstreamStatus as exc:
            if exc.status in (401, 403, 404):
                return False
            raise
        except UpstreamError:
            raise
