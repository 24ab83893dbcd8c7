"""The storage contract: content-addressed blobs and manifests, plus small metadata records.

A backend stores immutable content by digest (:class:`ContentStore`) and mutable, namespaced records
(:class:`MetadataStore`): tag -> digest answers, cached tag lists. Writes of content go through a
:class:`BlobWriter`; nothing is readable under its digest before ``commit`` has verified it.

Every method raises :class:`proxy.errors.StorageError` for an I/O failure. "Not there" is ``None``,
never an exception, and an I/O failure is never reported as "not there".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class BlobWriter(Protocol):
    """One upload into the store. Readable by others, at ``path``, while it is written."""

    #: The in-progress file; other readers may follow it as it grows.
    path: Path
    #: Bytes written so far.
    size: int

    def write(self, data: bytes) -> None:
        """Append ``data``. Raises StorageError (e.g. disk full)."""

    async def commit(self, expected_digest: str, expected_size: int | None = None) -> None:
        """Verify size and digest, make the content durable and visible under its digest.

        Raises UpstreamContentError if the bytes do not match (and cancels the write).
        """

    async def cancel(self) -> None:
        """Discard the upload. Safe to call after commit or twice."""


class ContentStore(Protocol):
    """Immutable content by digest: blobs (layers, configs) and manifests."""

    #: The directory holding local files (committed blobs and writes in progress).
    root: Path

    async def stat_blob(self, digest: str) -> int | None:
        """Size of the committed blob, or None if it is not stored."""

    def blob_path(self, digest: str) -> Path:
        """The local file holding the committed blob (for zero-copy serving); may not exist."""

    def blob_writer(self, digest: str) -> BlobWriter:
        """Start writing the blob ``digest``."""

    async def delete_blob(self, digest: str) -> bool:
        """Remove the blob; True if it was there."""

    async def get_manifest(self, digest: str) -> tuple[bytes, str] | None:
        """``(bytes, media_type)`` of a stored manifest, or None."""

    async def put_manifest(self, digest: str, data: bytes, media_type: str) -> None:
        """Store verified manifest bytes with their media type (verifies ``digest`` again)."""

    async def delete_manifest(self, digest: str) -> bool:
        """Remove the manifest; True if it was there."""


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

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        """The remembered answer for a tag, or None."""

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
