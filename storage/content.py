"""Content by digest and records by name, the same on every driver.

:class:`ContentStore` composes a :class:`storage.base.StorageDriver` into what the proxy needs:
verified blobs and manifests under content-addressed keys, tag answers and other small records per
upstream and repository, and the listings eviction and maintenance walk. Manifests and tag answers
are kept in memory too (they are read on every pull; manifests are immutable and verified).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from cachetools import LRUCache

from storage.base import BlobWriter, LocalFile, StorageDriver, TagEntry
from storage.errors import DigestMismatch, StorageError

log = logging.getLogger(__name__)

#: Bytes of manifests kept in memory.
MANIFEST_MEMORY = 64 * 1024 * 1024
KINDS = ("blobs", "manifests")


def split_digest(digest: str) -> tuple[str, str]:
    algorithm, _, hexpart = digest.partition(":")
    return algorithm, hexpart


def content_key(kind: str, digest: str) -> str:
    """``<kind>/<alg>/<hh>/<hex>`` (kind: blobs, manifests)."""
    algorithm, hexpart = split_digest(digest)
    return f"{kind}/{algorithm}/{hexpart[:2]}/{hexpart}"


def digest_of_key(key: str) -> tuple[str, str] | None:
    """``(kind, digest)`` of a content key, None for anything else (``.type`` files)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] not in KINDS or "." in parts[3]:
        return None
    return parts[0], f"{parts[1]}:{parts[3]}"


def record_key(upstream: str, repository: str, kind: str, key: str) -> str:
    # Names, tags and upstream names are validated before they get here; this is the last guard.
    parts = (upstream, *repository.split("/"), kind, key)
    if any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise StorageError("path escapes the storage directory", path=repr(parts), op="key")
    return f"repositories/{upstream}/{repository}/_{kind}/{key}"


@dataclass(frozen=True, slots=True)
class Content:
    """A committed blob or manifest as listed: kind is ``blob`` or ``manifest``."""

    kind: str
    digest: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class TagRecord:
    upstream: str
    repository: str
    tag: str
    mtime: float


class ContentStore:
    """Blobs, manifests and records on one driver (layout in ``storage/__init__.py``)."""

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self.name = driver.name
        self.instance = driver.instance
        #: Called with (digest, size) of every committed blob or manifest (size accounting).
        self.on_commit: Callable[[str, int], None] | None = None
        #: Called with the operation of every storage error (metrics).
        self.on_error: Callable[[str], None] | None = None
        #: Called with (kind, digest) of every blob or manifest read (LRU recency).
        self.on_access: Callable[[str, str], None] | None = None
        self._manifests: LRUCache[str, tuple[bytes, str]] = LRUCache(
            maxsize=MANIFEST_MEMORY, getsizeof=lambda item: len(item[0]) + 256
        )
        self._tags: LRUCache[tuple[str, str, str], TagEntry] = LRUCache(maxsize=100_000)

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Log and count a StorageError raised inside, then let it go on."""
        try:
            yield
        except StorageError as exc:
            self.failed(exc)
            raise

    def unavailable(self, exc: StorageError) -> None:
        """Reads of manifests and records while the store is unreachable (S3 down) answer "not
        there" once the error is logged and counted, so a pull falls back to upstream — the
        source of truth — instead of failing; ``/readyz`` says 503 meanwhile. A broken local
        disk is not "unreachable": it raises."""
        self.failed(exc)
        if not exc.unreachable:
            raise exc

    def failed(self, exc: StorageError) -> None:
        """Log and count a storage error once."""
        log.error("storage error: %s", exc)
        if self.on_error is not None:
            self.on_error(exc.op or "other")

    async def open(self) -> None:
        """Prepare the driver; a StorageError here stops start-up (the caller says why)."""
        await self.driver.open()

    async def close(self) -> None:
        await self.driver.close()

    async def check_ready(self) -> list[str]:
        return await self.driver.check_ready()

    # -- blobs ---------------------------------------------------------------------------------

    async def stat_blob(self, digest: str) -> int | None:
        """Size of the committed blob, or None."""
        local = self.local_blob(digest)
        if local is not None:
            return local.size
        with self._counted():
            info = await self.driver.stat(content_key("blobs", digest))
        return None if info is None else info.size

    def local_blob(self, digest: str) -> LocalFile | None:
        """The committed blob as a local file, if this process has one."""
        with self._counted():
            return self.driver.local(content_key("blobs", digest))

    async def read_blob(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes] | None:
        with self._counted():
            return await self.driver.read(content_key("blobs", digest), offset, length)

    def blob_writer(self, digest: str) -> BlobWriter:
        with self._counted():
            return self.driver.writer(content_key("blobs", digest), split_digest(digest)[0])

    def tier_writer(self, digest: str) -> BlobWriter | None:
        with self._counted():
            return self.driver.tier_writer(content_key("blobs", digest), split_digest(digest)[0])

    async def blob_url(self, digest: str, expires: float) -> str | None:
        with self._counted():
            return await self.driver.url_for(content_key("blobs", digest), expires)

    def observed(self, op: str, status: str, seconds: float) -> None:
        """Count a request to the store made past the driver (a GET of a presigned URL)."""
        if self.driver.on_request is not None:
            self.driver.on_request(op, status, seconds)

    async def delete_blob(self, digest: str) -> bool:
        with self._counted():
            return await self.driver.delete(content_key("blobs", digest))

    def committed(self, digest: str, size: int) -> None:
        if self.on_commit is not None:
            self.on_commit(digest, size)

    def accessed(self, kind: str, digest: str) -> None:
        """A blob or manifest was served: recency for eviction."""
        if self.on_access is not None:
            self.on_access(kind, digest)

    def touch(self, kind: str, digest: str) -> None:
        try:
            self.driver.touch(content_key(kind, digest))
        except StorageError as exc:
            log.error("cannot record use of cached content digest=%s error=%s", digest, exc)

    # -- manifests -----------------------------------------------------------------------------

    async def get_manifest(self, digest: str) -> tuple[bytes, str] | None:
        """``(bytes, media_type)`` of a stored manifest, or None."""
        found = self._manifests.get(digest)
        if found is None:
            key = content_key("manifests", digest)
            try:
                data = await self.driver.get(key)
                media_type = await self.driver.get(key + ".type") if data is not None else None
            except StorageError as exc:
                self.unavailable(exc)
                return None
            if data is None or media_type is None:
                return None
            algorithm, hexpart = split_digest(digest)
            if hashlib.new(algorithm, data).hexdigest() != hexpart:
                log.error("stored manifest does not match its digest key=%s", key)
                return None  # never served; `regproxy verify` quarantines it
            found = (data, media_type.decode())
            self._manifests[digest] = found
        self.accessed("manifests", digest)
        return found

    async def put_manifest(self, digest: str, data: bytes, media_type: str) -> None:
        """Store verified manifest bytes with their media type (verifies ``digest`` again)."""
        algorithm, hexpart = split_digest(digest)
        if hashlib.new(algorithm, data).hexdigest() != hexpart:
            raise DigestMismatch(f"manifest does not match {digest}")
        key = content_key("manifests", digest)
        with self._counted():
            # The type first: the manifest's presence is what says "stored".
            await self.driver.put(key + ".type", media_type.encode())
            await self.driver.put(key, data)
        self._manifests[digest] = (data, media_type)
        self.committed(digest, len(data))

    async def delete_manifest(self, digest: str) -> bool:
        self._manifests.pop(digest, None)
        key = content_key("manifests", digest)
        with self._counted():
            found = await self.driver.delete(key)
            await self.driver.delete(key + ".type")
        return found

    # -- records -------------------------------------------------------------------------------

    async def get_record(self, upstream: str, repository: str, kind: str, key: str) -> bytes | None:
        try:
            return await self.driver.get(record_key(upstream, repository, kind, key))
        except StorageError as exc:
            self.unavailable(exc)
            return None

    async def set_record(
        self, upstream: str, repository: str, kind: str, key: str, value: bytes
    ) -> None:
        with self._counted():
            await self.driver.put(record_key(upstream, repository, kind, key), value)

    async def delete_record(self, upstream: str, repository: str, kind: str, key: str) -> bool:
        with self._counted():
            return await self.driver.delete(record_key(upstream, repository, kind, key))

    async def get_tag(
        self, upstream: str, repository: str, tag: str, *, fresh: bool = False
    ) -> TagEntry | None:
        cached = None if fresh else self._tags.get((upstream, repository, tag))
        if cached is not None:
            return cached
        raw = await self.get_record(upstream, repository, "tags", tag)
        if raw is None:
            return None
        entry = parse_tag(raw)
        if entry is None:
            log.warning(
                "ignoring a corrupt tag record upstream=%s repository=%s tag=%s",
                upstream,
                repository,
                tag,
            )
            return None
        self._tags[(upstream, repository, tag)] = entry
        return entry

    async def set_tag(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        self._tags[(upstream, repository, tag)] = entry
        await self.set_record(upstream, repository, "tags", tag, dump_tag(entry))

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        self._tags.pop((upstream, repository, tag), None)
        await self.delete_record(upstream, repository, "tags", tag)

    def forget(self, digest: str) -> None:
        """Drop a manifest from memory (purged or evicted)."""
        self._manifests.pop(digest, None)

    # -- named files (stats of each replica) ----------------------------------------------------

    async def get_file(self, name: str) -> bytes | None:
        with self._counted():
            return await self.driver.get(name)

    async def put_file(self, name: str, data: bytes) -> None:
        with self._counted():
            await self.driver.put(name, data)

    async def list_files(self, prefix: str) -> list[str]:
        with self._counted():
            return [info.key async for info in self.driver.walk(prefix)]

    # -- listings ------------------------------------------------------------------------------

    async def list_content(self) -> list[Content]:
        """Every committed blob and manifest, with size and last modification."""
        found = []
        with self._counted():
            for top in KINDS:
                async for info in self.driver.walk(f"{top}/"):
                    parsed = digest_of_key(info.key)
                    if parsed is not None:
                        kind = "blob" if parsed[0] == "blobs" else "manifest"
                        found.append(Content(kind, parsed[1], info.size, info.mtime))
        return found

    async def list_tags(self) -> list[TagRecord]:
        """Every remembered tag answer."""
        found = []
        with self._counted():
            async for info in self.driver.walk("repositories/"):
                parts = info.key.split("/")
                if len(parts) >= 5 and parts[-2] == "_tags":
                    found.append(TagRecord(parts[1], "/".join(parts[2:-2]), parts[-1], info.mtime))
        return found

    async def reachable(self, digest: str, into: set[str], depth: int = 0) -> None:
        """Add ``digest`` and everything its manifest refers to (children, config, layers)."""
        into.add(digest)
        found = await self.get_manifest(digest)
        if found is None:
            return
        try:
            doc = json.loads(found[0])
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        for child in doc.get("manifests") or []:
            if isinstance(child, dict) and isinstance(child.get("digest"), str) and depth < 2:
                await self.reachable(child["digest"], into, depth + 1)
        for blob in [doc.get("config") or {}, *(doc.get("layers") or [])]:
            if isinstance(blob, dict) and isinstance(blob.get("digest"), str):
                into.add(blob["digest"])


def dump_tag(entry: TagEntry) -> bytes:
    return json.dumps(
        {
            "digest": entry.digest,
            "media_type": entry.media_type,
            "size": entry.size,
            "checked_at": entry.checked_at,
        }
    ).encode()


def parse_tag(raw: bytes | str) -> TagEntry | None:
    try:
        return TagEntry(**json.loads(raw))
    except (ValueError, TypeError):
        return None
