"""The storage contract: a small driver of bytes by key, composed by ``storage.content``.

A driver (:class:`StorageDriver`) stores opaque objects under ``/``-separated keys
(``blobs/sha256/ab/ab12…``, ``repositories/docker.io/library/alpine/_tags/3``). It knows nothing
of digests, manifests or tags; :class:`storage.content.ContentStore` builds those on top of it, the
same way for every backend. Two drivers exist: :mod:`storage.filesystem` and :mod:`storage.s3`.

Large content goes through a :class:`BlobWriter`: it spools to a local file that other readers may
follow while it grows, hashes as it goes, and makes the object visible under its key only in
``commit``, after size and digest were verified. Committed content is read back either as a local
file (for ``sendfile``), when the backend has one here, or as an async byte stream with an offset
and length.

Every method raises :class:`storage.errors.StorageError` for an I/O failure. "Not there" is
``None`` (or ``False``), never an exception, and an I/O failure is never reported as "not there".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and last modification (unix time)."""

    key: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A committed object held in a local file (zero-copy serving)."""

    path: Path
    size: int


class BlobWriter(Protocol):
    """One upload. Other readers may follow ``path`` while it grows."""

    #: The local file holding the bytes written so far.
    path: Path
    #: Bytes written so far.
    size: int

    def reserve(self, size: int) -> None:
        """Allocate local disk for ``size`` bytes ahead (best effort; a hint, never an error)."""

    async def write(self, data: bytes) -> None:
        """Append ``data``. Raises StorageError (disk full, object store away)."""

    async def make_durable(self) -> None:
        """From now on, publish to the store itself, the bytes written so far included (a
        writer that only filled a local read tier, taking over a download; a no-op for a
        writer that publishes anyway)."""

    async def commit(
        self,
        expected_digest: str,
        expected_size: int | None = None,
        *,
        verified: Callable[[], None] | None = None,
    ) -> None:
        """Verify size and digest, then make the object durable and visible under its key.

        ``verified`` is called as soon as the bytes are known good, before the publication (an
        fsync, an S3 upload's completion), so readers of ``path`` may finish. Raises
        DigestMismatch (after cancelling) if the bytes do not match, StorageError if the backend
        fails (also after cancelling: nothing is left half-visible).
        """

    async def cancel(self) -> None:
        """Discard the upload (and its local file). Safe after commit, and twice."""


class StorageDriver(Protocol):
    """Bytes by key. ``name`` is ``filesystem`` or ``s3``; ``location`` is for logs."""

    name: str
    location: str
    #: This process's id (temp directories, locks).
    instance: str
    #: Called with (operation, status, seconds) for every remote request (metrics); optional.
    on_request: Callable[[str, str, float], None] | None
    #: Temp files (and sizes) a dead process left, removed by ``open``.
    leftovers: list[tuple[Path, int]]

    async def open(self) -> None:
        """Prepare for use: check the location is reachable, clean what a dead process left."""

    async def close(self) -> None:
        """Release clients and this process's temp files."""

    async def check_ready(self) -> list[str]:
        """Problems that make this storage unfit to serve now (unwritable, full, unreachable)."""

    async def get(self, key: str) -> bytes | None:
        """A whole (small) object, or None."""

    async def put(self, key: str, data: bytes) -> None:
        """Store a whole (small) object, replacing any previous one atomically."""

    async def stat(self, key: str) -> ObjectInfo | None:
        """Size and mtime of an object, or None."""

    async def delete(self, key: str) -> bool:
        """Remove an object (and any local copy); True if it was there."""

    def walk(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a directory: ends with ``/``)."""

    def writer(self, key: str, algorithm: str) -> BlobWriter:
        """Start a durable upload to ``key``, hashed with ``algorithm``."""

    def tier_writer(self, key: str, algorithm: str) -> BlobWriter | None:
        """Start filling the local read tier with a committed object; None if every object is
        local already (the filesystem)."""

    def local(self, key: str) -> LocalFile | None:
        """The local file of a committed object, if this process has one."""

    async def read(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes] | None:
        """Open ``length`` bytes (all when None) of an object from ``offset``; None if absent.

        The returned iterator yields the bytes; a failure while reading raises StorageError.
        """

    async def url_for(self, key: str, expires: float) -> str | None:
        """A URL a client may GET the object from directly, or None if there is none."""

    def touch(self, key: str) -> None:
        """Note that an object was used now (recency for eviction), where the backend can."""

    async def quarantine(self, key: str, name: str) -> str:
        """Set a corrupt object aside as ``quarantine/<name>`` (or delete it); say where."""


@dataclass(frozen=True, slots=True)
class TagEntry:
    """What a tag pointed to when we last asked upstream."""

    digest: str
    media_type: str
    size: int
    #: Unix time of the last confirmation by upstream (a GET or a HEAD).
    checked_at: float


class MetadataStore(Protocol):
    """Small mutable records, namespaced by upstream name and repository."""

    async def get_tag(
        self, upstream: str, repository: str, tag: str, *, fresh: bool = False
    ) -> TagEntry | None:
        """The remembered answer for a tag, or None; ``fresh``: as stored now, not as this
        process remembers it (another process may have asked upstream since)."""

    async def set_tag(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        """Remember a tag's answer."""

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        """Forget a tag (upstream said it no longer exists)."""

    async def get_record(self, upstream: str, repository: str, kind: str, key: str) -> bytes | None:
        """An opaque record (e.g. a tags/list answer) or None."""

    async def set_record(
        self, upstream: str, repository: str, kind: str, key: str, value: bytes
    ) -> None:
        """Store an opaque record, replacing any previous one atomically."""


class Flight(Protocol):
    """One process at a time does a piece of work named by ``key``; the others wait for it and
    use its result from the store. Shared by the workers of a host (``storage.host``) or by the
    fleet (``storage.redis``); within a process, ``proxy.core.singleflight`` coalesces first."""

    async def lead(self, key: str) -> bool | None:
        """True: this process does the work (and must :meth:`land`); False: another does it now;
        None: cannot tell (the coordinator is away), so do it."""

    async def land(self, key: str) -> None:
        """The work this process led is over (done or failed)."""

    async def landed(self, key: str) -> bool:
        """Nobody holds ``key`` (its leader landed, or died)."""
