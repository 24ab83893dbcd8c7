"""The part of every :class:`storage.base.BlobWriter` that is the same on each backend.

Bytes are appended to a spool file in the process's own temp directory (which readers may follow
while it grows) and hashed as they go; ``commit`` verifies size and digest before the backend's
``_publish`` makes the object visible, and every failure path ends in ``cancel``.

Appending is split in two so that the costly part runs off the event loop:
:meth:`SpoolWriter.append` (``os.write`` and the hash update, both of which release the GIL on
large buffers) is plain blocking code that one worker thread at a time may call, and
:meth:`SpoolWriter.appended` records the new size on the event loop (where the S3 writer starts its
part uploads). ``write`` does both, the first in a thread when the data is large enough to be worth
the hop. The fd is closed only under the lock an append holds, so the append of a cancelled write
can never land in a file that reused the descriptor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno as errno_mod
import hashlib
import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from storage.errors import DigestMismatch, StorageError

log = logging.getLogger(__name__)

#: Writes at least this large are hashed and written in a worker thread; smaller ones inline
#: (a thread hop costs more than hashing a few KiB).
OFFLOAD_MIN = 64 * 1024
_IOV_MAX = 1024  # Linux's limit of buffers per writev
#: The threads that hash and write spools (shared by every writer of the process).
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="regproxy-spool")


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """``fallocate(2)`` itself: glibc's ``posix_fallocate`` (``os.posix_fallocate``) writes
    every block where the filesystem cannot allocate, which is what this must never cost."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_fallocate = _libc_fallocate()
_FALLOC_FL_KEEP_SIZE = 1
#: Blocks reserved ahead of the bytes written at most (see ``SpoolWriter.reserve``): appends land
#: in reserved blocks, yet a length announced by upstream cannot hold more disk than this beyond
#: what actually came.
RESERVE_AHEAD = 256 * 1024 * 1024


def os_error(message: str, path: object, exc: OSError, op: str) -> StorageError:
    """A StorageError for a failed local disk operation, naming errno."""
    name = errno_mod.errorcode.get(exc.errno or 0, str(exc.errno))
    err = StorageError(f"{message} ({name})", path=str(path), op=op)
    err.errno = exc.errno
    return err


def _write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write every chunk, in order, with as few system calls as the kernel allows (``writev``;
    a TLS upstream delivers the body in pieces of a few dozen KiB)."""
    views = [memoryview(c) for c in chunks if len(c)]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


class SpoolWriter:
    """Spools to a local file and hashes; subclasses publish the verified result."""

    def __init__(self, tmp_dir: Path, key: str, algorithm: str) -> None:
        self.key = key
        self.algorithm = algorithm
        self.path = tmp_dir / f"{key.rsplit('/', 1)[-1][:16]}-{uuid.uuid4().hex}"
        self.size = 0
        self._hash = hashlib.new(algorithm)
        self._state = "open"  # open -> committed | cancelled
        #: Held while a thread appends: the fd is closed only when no append runs.
        self._appending = threading.Lock()
        # Bytes written for hashing later, and those hashed since (one writer thread each).
        self._unhashed_in = 0
        self._unhashed_out = 0
        # Bytes the appends wrote, and the spool's blocks reserved up to / to reserve up to.
        self._appended = 0
        self._reserved = 0
        self._reserve_to = 0
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise os_error("cannot create temp file", self.path, exc, "write") from exc

    def reserve(self, size: int) -> None:
        """Allocate the spool's blocks ahead, keeping its size, up to ``size`` (the announced
        length) and at most ``RESERVE_AHEAD`` beyond the bytes written: on ext4, appending into
        them costs a third of the CPU of appending to a growing file (0.10 against 0.24-0.31 s
        per GiB here), which is a tenth of a cold blob's whole cost. Best effort: a filesystem
        without ``fallocate`` (or a full one) simply appends as before."""
        with self._appending:
            self._reserve_to = size
            self._reserve_ahead()

    def _reserve_ahead(self) -> None:
        """Reserve the next ``RESERVE_AHEAD`` once half of the last reservation is used (under
        ``_appending``)."""
        fd = self._fd
        if (
            _fallocate is None
            or fd is None
            or self._reserved >= self._reserve_to
            or self._appended + RESERVE_AHEAD // 2 < self._reserved
        ):
            return
        start = max(self._reserved, self._appended)
        end = min(self._reserve_to, self._appended + RESERVE_AHEAD)
        if end > start:
            _fallocate(fd, _FALLOC_FL_KEEP_SIZE, start, end - start)
        self._reserved = end

    async def write(self, data: bytes) -> None:
        await self.write_chunks((data,))

    async def make_durable(self) -> None:
        """Publish to the store, not only locally (see ``BlobWriter``): this writer does."""

    async def write_chunks(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks`` in order (one thread hop for all of them, no joining copy)."""
        total = sum(len(c) for c in chunks)
        if total >= OFFLOAD_MIN:
            await asyncio.wrap_future(_POOL.submit(self.append, chunks))
        else:
            self.append(chunks)
        await self.appended(total)

    def append(self, chunks: Sequence[bytes | memoryview], *, hash_later: bool = False) -> None:
        """Write and hash ``chunks`` (blocking; from one thread at a time). Follow with
        :meth:`appended` on the event loop before the bytes count as written.

        ``hash_later``: write only; the same bytes must then be passed to :meth:`hash` in the
        same order (another thread may do it meanwhile). ``commit`` refuses while any byte
        written is not hashed.
        """
        with self._appending:
            fd = self._fd
            if fd is None:
                raise StorageError("write after commit or cancel", path=str(self.path), op="write")
            try:
                _write_all(fd, chunks)
            except OSError as exc:
                raise os_error("cannot write temp file", self.path, exc, "write") from exc
            self._appended += sum(len(data) for data in chunks)
            if self._reserve_to:
                self._reserve_ahead()
            for data in chunks:
                if hash_later:
                    self._unhashed_in += len(data)
                else:
                    self._hash.update(data)

    def hash(self, data: bytes | memoryview) -> None:
        """Hash bytes written with ``append(..., hash_later=True)``, in order (blocking; one
        thread at a time, which may run alongside the appending one)."""
        self._hash.update(data)
        self._unhashed_out += len(data)

    async def appended(self, count: int) -> None:
        """``count`` more bytes were appended (by :meth:`append`): they are readable now."""
        before, self.size = self.size, self.size + count
        await self._written(before)

    async def commit(
        self,
        expected_digest: str,
        expected_size: int | None = None,
        *,
        verified: Callable[[], None] | None = None,
    ) -> None:
        if self._state != "open":
            raise StorageError("commit after commit or cancel", path=str(self.path), op="write")
        actual = f"{self.algorithm}:{self._hash.hexdigest()}"
        problem = None
        if self._unhashed_in != self._unhashed_out:
            problem = f"{self._unhashed_in - self._unhashed_out} bytes written but not hashed"
        elif expected_size is not None and self.size != expected_size:
            problem = f"size mismatch: expected {expected_size}, got {self.size}"
        elif actual != expected_digest:
            problem = f"digest mismatch: expected {expected_digest}, got {actual}"
        if problem is not None:
            await self.cancel()
            raise DigestMismatch(problem)
        if verified is not None:
            # Publishing takes long (the filesystem's fsync of a GiB, an upload's last part and
            # completion): the verified bytes in the spool may go out meanwhile.
            verified()
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
        with self._appending:  # waits for an append still running in a thread
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
