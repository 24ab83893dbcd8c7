"""The filesystem backend: the embedded default, needing no other service.

Content becomes visible only through ``os.replace`` of a fully written, fsynced, verified temp file,
so a crash at any moment leaves either the whole verified file or nothing under its digest; the
temp files it leaves behind are removed at the next start (see :meth:`FilesystemStorage.open`).

Blob and manifest writes use plain ``os.write`` on the event loop: writes into the page cache take
microseconds, and a thread hop per chunk costs more than it saves. ``fsync`` (which can take
milliseconds) runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from cachetools import LRUCache

from proxy.errors import StorageError, UpstreamContentError
from storage.base import TagEntry

log = logging.getLogger(__name__)

#: Bytes of manifests kept in memory.
MANIFEST_MEMORY = 64 * 1024 * 1024


def _split(digest: str) -> tuple[str, str]:
    algorithm, _, hexpart = digest.partition(":")
    return algorithm, hexpart


def content_path(root: Path, kind: str, digest: str) -> Path:
    """Where ``digest`` lives under ``root``: ``<kind>/<alg>/<hh>/<hex>`` (blobs, manifests)."""
    algorithm, hexpart = _split(digest)
    return root / kind / algorithm / hexpart[:2] / hexpart


class FilesystemBlobWriter:
    """Writes one blob to a temp file, hashing as it goes."""

    def __init__(self, storage: FilesystemStorage, digest: str) -> None:
        self._storage = storage
        self._digest = digest
        self._final = storage.blob_path(digest)
        self.path = storage.tmp_dir / f"{_split(digest)[1][:16]}-{uuid.uuid4().hex}"
        self.size = 0
        self._hash = hashlib.new(_split(digest)[0])
        self._done = False
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise storage.error("cannot create temp file", self.path, exc) from exc

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise StorageError("write after commit or cancel", path=str(self.path))
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise self._storage.error("cannot write temp file", self.path, exc) from exc
        self._hash.update(data)
        self.size += len(data)

    async def commit(self, expected_digest: str, expected_size: int | None = None) -> None:
        actual = f"{_split(expected_digest)[0]}:{self._hash.hexdigest()}"
        if expected_size is not None and self.size != expected_size:
            await self.cancel()
            raise UpstreamContentError(
                f"size mismatch: expected {expected_size}, got {self.size}", upstream=""
            )
        if actual != expected_digest:
            await self.cancel()
            raise UpstreamContentError(
                f"digest mismatch: expected {expected_digest}, got {actual}", upstream=""
            )
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            await asyncio.to_thread(os.fsync, fd)
            os.close(fd)
            self._final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, self._final)
            if self._storage.on_commit is not None:
                self._storage.on_commit(self.size)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            await self.cancel()
            raise self._storage.error("cannot commit blob", self._final, exc) from exc
        self._done = True

    async def cancel(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if not self._done:
            self._done = True
            with contextlib.suppress(FileNotFoundError):
                try:
                    self.path.unlink()
                except OSError as exc:
                    log.error("cannot remove temp file path=%s error=%s", self.path, exc)


class FilesystemStorage:
    """Content and metadata in one directory tree (layout in ``storage/__init__.py``)."""

    name = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.instance = uuid.uuid4().hex[:12]
        self.tmp_dir = self.root / "tmp" / self.instance
        self._lock_fd: int | None = None
        #: Called with the size of every committed blob or manifest (size accounting).
        self.on_commit: Callable[[int], None] | None = None
        #: Called with the operation ("write", "read", ...) of every storage error (metrics).
        self.on_error: Callable[[str], None] | None = None
        #: Called with (path, digest) when a stored manifest is read (LRU recency).
        self.on_access: Callable[[Path, str], None] | None = None
        # In memory: manifests (immutable, verified) and tag answers, read on every pull.
        self._manifests: LRUCache[str, tuple[bytes, str]] = LRUCache(
            maxsize=MANIFEST_MEMORY, getsizeof=lambda item: len(item[0]) + 256
        )
        self._tags: LRUCache[tuple[str, str, str], TagEntry] = LRUCache(maxsize=100_000)

    def error(self, message: str, path: Path, exc: OSError) -> StorageError:
        """A StorageError for a failed disk operation, logged and counted once here."""
        err = StorageError(
            f"{message} ({errno.errorcode.get(exc.errno or 0, exc.errno)})", path=str(path)
        )
        err.errno = exc.errno  # type: ignore[attr-defined]
        log.error("storage error: %s", err)
        if self.on_error is not None:
            self.on_error(message.removeprefix("cannot ").split()[0])
        return err

    # -- lifetime --------------------------------------------------------------------------------

    def open(self) -> int:
        """Create the tree, claim a temp directory and remove what dead processes left.

        Each process writes into ``tmp/<instance>/`` while holding an ``flock`` on its
        ``.lock``; a directory whose lock can be taken belongs to a process that is gone (killed,
        crashed), so its partial downloads are deleted. Returns how many files were removed.
        """
        try:
            for sub in ("blobs", "manifests", "repositories", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir()
            self._lock_fd = os.open(self.tmp_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise self.error("cannot prepare storage directory", self.root, exc) from exc
        return self.remove_stale_temp()

    def remove_stale_temp(self) -> int:
        removed = 0
        for entry in (self.root / "tmp").iterdir():
            if entry == self.tmp_dir:
                continue
            if entry.is_dir() and not self._owned_by_live_process(entry):
                removed += sum(1 for p in entry.iterdir() if p.name != ".lock")
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed temp files left by a previous run count=%d", removed)
        return removed

    @staticmethod
    def _owned_by_live_process(directory: Path) -> bool:
        try:
            fd = os.open(directory / ".lock", os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the lock we may have taken
        return False

    def check_ready(self, min_free: int = 16 * 1024 * 1024) -> list[str]:
        """Problems that make this storage unfit to serve: not writable, disk full."""
        problems = []
        probe = self.tmp_dir / "ready-probe"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ok")
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError as exc:
            problems.append(f"storage not writable: {os.strerror(exc.errno or 0)}")
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            problems.append(f"storage not readable: {os.strerror(exc.errno or 0)}")
        else:
            free = st.f_bavail * st.f_frsize
            if free < min_free:
                problems.append(f"disk full: {free} bytes free")
        return problems

    def close(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- content ---------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return content_path(self.root, "blobs", digest)

    def _manifest_path(self, digest: str) -> Path:
        return content_path(self.root, "manifests", digest)

    async def stat_blob(self, digest: str) -> int | None:
        path = self.blob_path(digest)
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self.error("cannot stat blob", path, exc) from exc

    def blob_writer(self, digest: str) -> FilesystemBlobWriter:
        return FilesystemBlobWriter(self, digest)

    async def delete_blob(self, digest: str) -> bool:
        return self._unlink(self.blob_path(digest))

    def _unlink(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self.error("cannot delete", path, exc) from exc
        return True

    async def get_manifest(self, digest: str) -> tuple[bytes, str] | None:
        path = self._manifest_path(digest)
        found = self._manifests.get(digest)
        if found is None:
            try:
                data = path.read_bytes()
                media_type = path.with_name(path.name + ".type").read_text()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self.error("cannot read manifest", path, exc) from exc
            algorithm, hexpart = _split(digest)
            if hashlib.new(algorithm, data).hexdigest() != hexpart:
                log.error("stored manifest does not match its digest path=%s", path)
                return None  # never served; `regproxy verify` quarantines it
            found = (data, media_type)
            self._manifests[digest] = found
        if self.on_access is not None:
            self.on_access(path, digest)
        return found

    async def put_manifest(self, digest: str, data: bytes, media_type: str) -> None:
        algorithm, hexpart = _split(digest)
        if hashlib.new(algorithm, data).hexdigest() != hexpart:
            raise UpstreamContentError(f"manifest does not match {digest}", upstream="")
        path = self._manifest_path(digest)
        # The type file first: the manifest file's presence is what says "stored".
        self._write_atomic(path.with_name(path.name + ".type"), media_type.encode())
        self._write_atomic(path, data)
        self._manifests[digest] = (data, media_type)
        if self.on_commit is not None:
            self.on_commit(len(data))

    async def delete_manifest(self, digest: str) -> bool:
        self._manifests.pop(digest, None)
        path = self._manifest_path(digest)
        found = self._unlink(path)
        self._unlink(path.with_name(path.name + ".type"))
        return found

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self.tmp_dir / f"w-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # on a read-only disk even this fails
                tmp.unlink(missing_ok=True)
            raise self.error("cannot write", path, exc) from exc

    # -- metadata --------------------------------------------------------------------------------

    def _record_path(self, upstream: str, repository: str, kind: str, key: str) -> Path:
        # Names, tags and upstream names are validated before they get here; this is the last
        # guard, without a realpath per request (the benchmark found 13 % of a tag hit there).
        parts = (upstream, *repository.split("/"), kind, key)
        if any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts) or "/" in key:
            raise StorageError("path escapes the storage directory", path=repr(parts))
        return self.root / "repositories" / upstream / repository / f"_{kind}" / key

    async def get_record(self, upstream: str, repository: str, kind: str, key: str) -> bytes | None:
        path = self._record_path(upstream, repository, kind, key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self.error("cannot read record", path, exc) from exc

    async def set_record(
        self, upstream: str, repository: str, kind: str, key: str, value: bytes
    ) -> None:
        self._write_atomic(self._record_path(upstream, repository, kind, key), value)

    async def delete_record(self, upstream: str, repository: str, kind: str, key: str) -> None:
        self._unlink(self._record_path(upstream, repository, kind, key))

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        cached = self._tags.get((upstream, repository, tag))
        if cached is not None:
            return cached
        raw = await self.get_record(upstream, repository, "tags", tag)
        if raw is None:
            return None
        try:
            entry = TagEntry(**json.loads(raw))
            self._tags[(upstream, repository, tag)] = entry
            return entry
        except (ValueError, TypeError):
            log.warning(
                "ignoring a corrupt tag record upstream=%s repository=%s tag=%s",
                upstream,
                repository,
                tag,
            )
            return None

    async def set_tag(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        self._tags[(upstream, repository, tag)] = entry
        record = {
            "digest": entry.digest,
            "media_type": entry.media_type,
            "size": entry.size,
            "checked_at": entry.checked_at,
        }
        await self.set_record(upstream, repository, "tags", tag, json.dumps(record).encode())

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        self._tags.pop((upstream, repository, tag), None)
        await self.delete_record(upstream, repository, "tags", tag)
