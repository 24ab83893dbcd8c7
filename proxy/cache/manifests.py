"""The manifest read path: digests from the store, tags through the freshness policy.

* By digest: immutable. Served from the store; a miss is one upstream GET (coalesced), verified
  against the digest, stored with its media type, served byte for byte.
* By tag: the tag -> digest answer is trusted for the upstream's ``tag_ttl``. After that it is
  revalidated with a HEAD (Docker Hub does not count HEADs against the pull limit); a GET happens
  only when the digest changed or the upstream's HEAD carries no digest. A client's HEAD never
  becomes an upstream GET.
* Across processes (the workers of a host, the replicas of a fleet): a ``flight``
  (``storage.base.Flight``) lets one of them ask upstream for a manifest or a tag while the
  others wait for its answer in the store, so a burst of pulls costs one manifest GET however
  many processes take it (Docker Hub's pull limit counts manifest GETs). A leader that fails or
  dies leaves the others to ask themselves.
* Stale-if-error: when revalidation fails (refused, timeout, 5xx, 429) and the tag's manifest is
  cached, the cached one is served, marked ``X-Cache: STALE`` and logged. A 404 from upstream is
  an answer, not an error: the tag is forgotten and the client gets MANIFEST_UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from proxy.core.errors import (
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    StorageError,
    UpstreamContentError,
    UpstreamError,
    UpstreamStatus,
    to_registry_error,
)
from proxy.core.media import ACCEPT_MANIFESTS, MANIFEST_TYPES
from proxy.core.reference import digest_of, is_digest
from proxy.core.singleflight import SingleFlight
from proxy.fetch.upstream import Upstream
from storage.base import Flight, MetadataStore, TagEntry
from storage.content import ContentStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The OCI spec's bound: manifests up to 4 MiB must be accepted; we refuse larger ones.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_TAGS_LIST_SIZE = 16 * 1024 * 1024
#: How long a process waits for another's manifest fetch before asking upstream itself (seconds),
#: and how often it looks.
FLIGHT_WAIT = 30.0
FLIGHT_POLL = 0.01


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest answer. ``data`` is None for a HEAD answered from headers alone."""

    digest: str
    media_type: str
    size: int
    data: bytes | None
    #: ``HIT``, ``MISS`` or ``STALE``.
    cache: str


def check_manifest(data: bytes, content_type: str | None, *, upstream: str) -> str:
    """Validate manifest bytes from upstream; return their media type."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise UpstreamContentError("manifest larger than 4 MiB", upstream=upstream)
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamContentError("manifest is not valid JSON", upstream=upstream) from exc
    if not isinstance(body, dict):
        raise UpstreamContentError("manifest is not a JSON object", upstream=upstream)
    declared = body.get("mediaType")
    content_type = (content_type or "").split(";")[0].strip()
    if declared and content_type in MANIFEST_TYPES and declared != content_type:
        raise UpstreamContentError(
            "manifest mediaType contradicts its Content-Type", upstream=upstream
        )
    media_type = content_type if content_type in MANIFEST_TYPES else declared
    if not media_type:
        media_type = (
            "application/vnd.oci.image.index.v1+json"
            if "manifests" in body
            else "application/vnd.oci.image.manifest.v1+json"
        )
    return str(media_type)


class ManifestService:
    """Serves manifests and tag lists for every upstream."""

    def __init__(self, store: ContentStore, meta: MetadataStore, *, offline: bool = False) -> None:
        self.store = store
        self.meta = meta
        self.offline = offline
        self._fetches: SingleFlight[tuple[str, str], Manifest] = SingleFlight()
        self._revalidations: SingleFlight[tuple[str, str, str], TagEntry] = SingleFlight()
        #: Shared with the other processes on this store (None: this process alone).
        self.flight: Flight | None = None

    async def get(
        self, upstream: Upstream, repository: str, reference: str, *, head: bool
    ) -> Manifest:
        if is_digest(reference):
            return await self.by_digest(upstream, repository, reference, head=head)
        return await self.by_tag(upstream, repository, reference, head=head)

    # -- by digest -------------------------------------------------------------------------------

    async def local(self, digest: str, cache: str = "HIT") -> Manifest | None:
        found = await self.store.get_manifest(digest)
        if found is None:
            return None
        data, media_type = found
        return Manifest(digest, media_type, len(data), data, cache)

    async def by_digest(
        self, upstream: Upstream, repository: str, digest: str, *, head: bool
    ) -> Manifest:
        found = await self.local(digest)
        if found is not None:
            return found
        if self.offline:
            raise ManifestUnknown({"digest": digest}, message="manifest not cached (offline mode)")
        try:
            if head:
                return await self._head(upstream, repository, digest)
            return await self._fetches.run(
                (repository, digest),
                lambda: self._shared(
                    f"manifest:{digest}",
                    lambda: self._fetch(upstream, repository, digest),
                    lambda started: self.local(digest, "MISS"),
                ),
            )
        except UpstreamError as exc:
            raise to_registry_error(exc, not_found=ManifestUnknown) from exc

    async def _head(self, upstream: Upstream, repository: str, reference: str) -> Manifest:
        async with upstream.request(
            "HEAD",
            f"/v2/{repository}/manifests/{reference}",
            scope=f"repository:{repository}:pull",
            headers={"Accept": ACCEPT_MANIFESTS},
        ) as resp:
            digest = resp.headers.get("Docker-Content-Digest", "")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            size = resp.content_length
        if is_digest(reference) and digest and digest != reference:
            raise UpstreamContentError("HEAD answered another digest", upstream=upstream.name)
        if is_digest(reference):
            digest = reference
        if not digest or media_type not in MANIFEST_TYPES or size is None:
            # Not enough to answer from headers: fall back to the bytes themselves.
            return await self._fetch(upstream, repository, reference)
        return Manifest(digest, media_type, size, None, "MISS")

    async def _fetch(self, upstream: Upstream, repository: str, reference: str) -> Manifest:
        """GET a manifest by tag or digest, verify it, store it."""
        async with upstream.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scope=f"repository:{repository}:pull",
            headers={"Accept": ACCEPT_MANIFESTS},
        ) as resp:
            if resp.content_length is not None and resp.content_length > MAX_MANIFEST_SIZE:
                raise UpstreamContentError("manifest larger than 4 MiB", upstream=upstream.name)
            data = await resp.content.read(MAX_MANIFEST_SIZE + 1)
            if resp.content_length is not None and len(data) != resp.content_length:
                raise UpstreamContentError(
                    "manifest shorter than announced", upstream=upstream.name
                )
            content_type = resp.headers.get("Content-Type")
            header_digest = resp.headers.get("Docker-Content-Digest")
        media_type = check_manifest(data, content_type, upstream=upstream.name)
        if is_digest(reference):
            algorithm = reference.partition(":")[0]
            digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
            if digest != reference:
                raise UpstreamContentError(
                    "manifest does not match its digest", upstream=upstream.name
                )
        else:
            digest = digest_of(data)
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise UpstreamContentError(
                    "manifest does not match Docker-Content-Digest", upstream=upstream.name
                )
        await self._keep(self.store.put_manifest(digest, data, media_type))
        return Manifest(digest, media_type, len(data), data, "MISS")

    @staticmethod
    async def _keep(write: Awaitable[None]) -> None:
        """Store what was verified; a failing disk is logged and counted, never fails the pull
        that upstream just answered."""
        with contextlib.suppress(StorageError):
            await write

    # -- by tag ----------------------------------------------------------------------------------

    async def by_tag(
        self, upstream: Upstream, repository: str, tag: str, *, head: bool, force: bool = False
    ) -> Manifest:
        """``force``: ask upstream (HEAD) even within the tag TTL (scheduled sync does)."""
        ttl = upstream.config.tag_ttl
        entry = await self.meta.get_tag(upstream.name, repository, tag)
        if entry is not None and self.flight is not None and time.time() - entry.checked_at >= ttl:
            # what this process remembers is old: another may have asked upstream since
            entry = await self.meta.get_tag(upstream.name, repository, tag, fresh=True)
        if entry is not None and (
            self.offline or (not force and time.time() - entry.checked_at < ttl)
        ):
            answer = await self._answer(upstream, repository, entry, head=head, cache="HIT")
            if answer is not None:
                return answer
        if self.offline:
            raise ManifestUnknown({"tag": tag}, message="manifest not cached (offline mode)")
        try:
            fresh = await self._revalidations.run(
                (upstream.name, repository, tag),
                lambda: self._shared(
                    f"tag:{upstream.name}:{repository}:{tag}",
                    lambda: self._revalidate(upstream, repository, tag),
                    lambda started: self._checked_since(upstream.name, repository, tag, started),
                ),
            )
        except UpstreamError as exc:
            if entry is not None and not (isinstance(exc, UpstreamStatus) and exc.status == 404):
                stale = await self._answer(upstream, repository, entry, head=head, cache="STALE")
                if stale is not None:
                    log.warning(
                        "serving stale tag upstream=%s repository=%s tag=%s error=%s",
                        upstream.name,
                        repository,
                        tag,
                        exc,
                    )
                    return stale
            raise to_registry_error(exc, not_found=ManifestUnknown) from exc
        cache = "HIT" if entry is not None and entry.digest == fresh.digest else "MISS"
        if entry is None:
            # A tag this fleet did not know (or that ``regproxy cache purge`` removed, with its
            # manifest, from the store): the store says whether the manifest is there, not the
            # copy this process may hold in memory.
            self.store.forget(fresh.digest)
        answer = await self._answer(upstream, repository, fresh, head=head, cache=cache)
        if answer is not None:
            return answer
        try:
            return await self.by_digest(upstream, repository, fresh.digest, head=head)
        except RegistryError as exc:
            # The new answer's manifest could not be fetched or verified: do not keep
            # pointing the tag at it (a later HEAD would answer an unverified digest).
            if entry is not None and entry.digest != fresh.digest:
                await self._keep(self.meta.set_tag(upstream.name, repository, tag, entry))
            elif entry is None:
                await self._keep(self.meta.delete_tag(upstream.name, repository, tag))
            if isinstance(exc, ManifestUnknown):
                raise ManifestUnknown({"tag": tag}) from None
            raise

    async def _answer(
        self, upstream: Upstream, repository: str, entry: TagEntry, *, head: bool, cache: str
    ) -> Manifest | None:
        """Answer from what is stored for ``entry``; None if its bytes are needed and missing."""
        if head:
            return Manifest(entry.digest, entry.media_type, entry.size, None, cache)
        return await self.local(entry.digest, cache)

    async def _revalidate(self, upstream: Upstream, repository: str, tag: str) -> TagEntry:
        """Ask upstream what ``tag`` is now (HEAD, or GET if HEAD lacks a digest); remember it."""
        try:
            answer = await self._head(upstream, repository, tag)
        except UpstreamStatus as exc:
            if exc.status == 404:
                await self._keep(self.meta.delete_tag(upstream.name, repository, tag))
            raise
        entry = TagEntry(answer.digest, answer.media_type, answer.size, time.time())
        await self._keep(self.meta.set_tag(upstream.name, repository, tag, entry))
        return entry

    async def _checked_since(
        self, upstream: str, repository: str, tag: str, since: float
    ) -> TagEntry | None:
        entry = await self.meta.get_tag(upstream, repository, tag, fresh=True)
        return entry if entry is not None and entry.checked_at >= since else None

    # -- across processes ------------------------------------------------------------------------

    async def _shared(
        self,
        name: str,
        work: Callable[[], Awaitable[T]],
        answer: Callable[[float], Awaitable[T | None]],
    ) -> T:
        """``work()`` in one process of those sharing ``self.flight``; the others wait until it
        lands, then take ``answer(started)`` from the store (``started``: when they began to
        wait, a Unix time), or do the work themselves when there is none (the leader failed)."""
        flight = self.flight
        if flight is None:
            return await work()
        started = time.time()
        held = await flight.lead(name)
        if held is False:
            for _ in range(int(FLIGHT_WAIT / FLIGHT_POLL)):  # another process: no event to await
                if await flight.landed(name):
                    break
                await asyncio.sleep(FLIGHT_POLL)
            found = await answer(started)
            if found is not None:
                return found
            held = await flight.lead(name)  # False: another follower leads now; not twice
        try:
            return await work()
        finally:
            if held:
                await flight.land(name)

    # -- tags/list -------------------------------------------------------------------------------

    async def tags_list(
        self, upstream: Upstream, repository: str, query: dict[str, str]
    ) -> tuple[bytes, dict[str, str], str]:
        """``(body, headers, cache)`` of a tags/list answer; the cached one if upstream fails."""
        key = hashlib.sha256(json.dumps(sorted(query.items())).encode()).hexdigest()[:32]
        if not self.offline:
            try:
                async with upstream.request(
                    "GET",
                    f"/v2/{repository}/tags/list",
                    scope=f"repository:{repository}:pull",
                    query=query,
                ) as resp:
                    body = await resp.content.read(MAX_TAGS_LIST_SIZE)
                    link = resp.headers.get("Link")
                json.loads(body)
                record = json.dumps({"body": body.decode(), "link": link}).encode()
                await self._keep(
                    self.meta.set_record(upstream.name, repository, "tagslist", key, record)
                )
                return body, ({"Link": link} if link else {}), "MISS"
            except (UpstreamError, ValueError, UnicodeDecodeError) as exc:
                cached = await self.meta.get_record(upstream.name, repository, "tagslist", key)
                if cached is None:
                    if isinstance(exc, UpstreamError):
                        raise to_registry_error(exc, not_found=NameUnknown) from exc
                    raise to_registry_error(
                        UpstreamContentError("invalid tags list", upstream=upstream.name),
                        not_found=NameUnknown,
                    ) from exc
                log.warning(
                    "serving stale tags list upstream=%s repository=%s error=%s",
                    upstream.name,
                    repository,
                    exc,
                )
        else:
            cached = await self.meta.get_record(upstream.name, repository, "tagslist", key)
            if cached is None:
                raise NameUnknown({"name": repository}, message="tags not cached (offline mode)")
        stored = json.loads(cached)
        headers = {"Link": stored["link"]} if stored.get("link") else {}
        return stored["body"].encode(), headers, "STALE"
