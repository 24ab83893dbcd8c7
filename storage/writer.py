"""The part of every :class:`storage.base.BlobWriter` that is the same on each backend.

Bytes are appended to a spool file in the process's own temp directory (which readers may follow
while it grows) and hashed as they go; ``commit`` verifies size and digest before the backend's
``_publish`` makes the object visible, and every failure path ends in ``cancel``.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import hashlib
import logging
import os
import uuid
from pathlib import Path

from storage.errors import DigestMismatch, StorageError

log = logging.getLogger(__name__)


def os_error(message: str, path: object, exc: OSError, op: str) -> StorageError:
    """A StorageError for a failed local disk operation, naming errno."""
    name = errno_mod.errorcode.get(exc.errno or 0, str(exc.errno))
    err = StorageError(f"{message} ({name})", path=str(path), op=op)
    err.errno = exc.errno
    return err


class SpoolWriter:
    """Spools to a local file and hashes; subclasses publish the verified result."""

    def __init__(self, tmp_dir: Path, key: str, algorithm: str) -> None:
        self.key = key
        self.algorithm = algorithm
        self.path = tmp_dir / f"{key.rsplit('/', 1)[-1][:16]}-{uuid.uuid4().hex}"
        self.size = 0
        self._hash = hashlib.new(algorithm)
        self._state = "open"  # open -> committed | cancelled
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise os_error("cannot create temp file", self.path, exc, "write") from exc

    async def write(self, data: bytes) -> None:
        if self._fd is None:
            raise StorageError("write after commit or cancel", path=str(self.path), op="write")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise os_error("cannot write temp file", self.path, exc, "write") from exc
        self._hash.update(data)
        before, self.size = self.size, self.size + len(data)
        await self._written(before)

    async def commit(self, expected_digest: str, expected_size: int | None = None) -> None:
        if self._state != "open":
            raise StorageError("commit after commit or cancel", path=str(self.path), op="write")
        actual = f"{self.algorithm}:{self._hash.hexdigest()}"
        problem = None
        if expected_size is not None and self.size != expected_size:
            problem = f"size mismatch: expected {expected_size}, got {self.size}"
        elif actual != expected_digest:
            problem = f"digest mismatch: expected {expected_digest}, got {actual}"
        if problem is not None:
            await self.cancel()
            raise DigestMismatch(problem)
        try:
            await self._publish()
        except BaseException:
            await self.cancel()
            raise
        self._state = "committed"
        self._close_fd()

    async def cancel(self) -> None:
        self._close_fd()
        if self._state == "open":
            self._state = "cancelled"
            with contextlib.suppress(FileNotFoundError):
                try:
                    self.path.unlink()
                except OSError as exc:
                    log.error("cannot remove temp file path=%s error=%s", self.path, exc)
            await self._discard()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # -- hooks ---------------------------------------------------------------------------------

    async def _written(self, before: int) -> None:
        """Bytes ``before:size`` were appended (S3 starts uploading full parts here)."""

    async def _publish(self) -> None:
        """Make the verified spool durable and visible under ``key``."""
        raise NotImplementedError

    async def _discard(self) -> None:
        """Undo whatever the backend started (an S3 multipart upload)."""
