"""The filesystem driver: the embedded default, needing no other service.

Objects are files under ``root`` named by their key. Content becomes visible only through
``os.replace`` of a fully written, fsynced, verified temp file, so a crash at any moment leaves
either the whole verified file or nothing under its key; the temp files it leaves behind are
removed at the next start (see :meth:`FilesystemDriver.open`).

Writes go through :class:`storage.writer.SpoolWriter`: large appends are hashed and written in a
worker thread, a batch of chunks per hop (hashing and copying into the page cache were a third of
the event loop's time on a cold blob). ``fsync`` (which can take milliseconds) runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from storage.base import LocalFile, ObjectInfo
from storage.errors import StorageError
from storage.writer import SpoolWriter, os_error

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


class FilesystemWriter(SpoolWriter):
    """Spool in ``tmp/<instance>/``, then fsync and rename onto the key's file."""

    def __init__(self, driver: FilesystemDriver, key: str, algorithm: str) -> None:
        super().__init__(driver.tmp_dir, key, algorithm)
        self._final = driver.path_of(key)

    async def _publish(self) -> None:
        fd = self._fd
        assert fd is not None
        try:
            await asyncio.to_thread(os.fsync, fd)
            self._final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, self._final)
        except OSError as exc:
            raise os_error("cannot commit", self._final, exc, "write") from exc
        self.path = self._final  # the bytes live on under their key; followers may reopen it


class FilesystemDriver:
    """Objects as files under one directory (layout in ``storage/__init__.py``)."""

    name = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.location = str(self.root)
        self.instance = uuid.uuid4().hex[:12]
        self.tmp_dir = self.root / "tmp" / self.instance
        self._lock_fd: int | None = None
        #: Temp files of dead processes removed by ``open`` (``regproxy gc`` reports them).
        self.leftovers: list[tuple[Path, int]] = []
        self.on_request: Callable[[str, str, float], None] | None = None

    def path_of(self, key: str) -> Path:
        # Keys are built by storage.content from validated names; this is the last guard.
        parts = key.split("/")
        if any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise StorageError("key escapes the storage directory", path=repr(key), op="key")
        return self.root.joinpath(*parts)

    # -- lifetime ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the tree, claim a temp directory and remove what dead processes left.

        Each process writes into ``tmp/<instance>/`` while holding an ``flock`` on its
        ``.lock``; a directory whose lock can be taken belongs to a process that is gone (killed,
        crashed), so its partial downloads are deleted.
        """
        try:
            for sub in ("blobs", "manifests", "repositories", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir()
            self._lock_fd = os.open(self.tmp_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise os_error("cannot prepare storage directory", self.root, exc, "open") from exc
        self.leftovers = remove_stale_temp(self.root / "tmp", keep=self.tmp_dir)

    async def close(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def check_ready(self) -> list[str]:
        return check_local_dir(self.tmp_dir, self.root)

    # -- objects -------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        path = self.path_of(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error("cannot read", path, exc, "read") from exc

    async def put(self, key: str, data: bytes) -> None:
        path = self.path_of(key)
        tmp = self.tmp_dir / f"w-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:  # noqa: ASYNC230 - small records, page cache
                handle.write(data)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # on a read-only disk even this fails
                tmp.unlink(missing_ok=True)
            raise os_error("cannot write", path, exc, "write") from exc

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self.path_of(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error("cannot stat", path, exc, "stat") from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    async def delete(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise os_error("cannot delete", path, exc, "delete") from exc
        return True

    async def walk(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        found = await asyncio.to_thread(self._walk, prefix)
        for info in found:
            yield info

    def _walk(self, prefix: str) -> list[ObjectInfo]:
        directory = prefix.rpartition("/")[0]
        top = self.path_of(directory) if directory else self.root
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(top, onerror=_log_walk_error):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            if rel == "tmp" or rel.startswith("tmp/") or rel.startswith("quarantine"):
                dirnames.clear()
                continue
            for name in filenames:
                key = f"{rel}/{name}" if rel != "." else name
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(dirpath, name))
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return found

    def writer(self, key: str, algorithm: str) -> FilesystemWriter:
        return FilesystemWriter(self, key, algorithm)

    def tier_writer(self, key: str, algorithm: str) -> None:
        return None  # every committed object is a local file already

    def local(self, key: str) -> LocalFile | None:
        path = self.path_of(key)
        try:
            return LocalFile(path, os.stat(path).st_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error("cannot stat", path, exc, "stat") from exc

    async def read(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes] | None:
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error("cannot read", path, exc, "read") from exc
        return _read_fd(fd, offset, length, path)

    async def url_for(self, key: str, expires: float) -> str | None:
        return None

    async def quarantine(self, key: str, name: str) -> str:
        target = self.root / "quarantine" / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path_of(key), target)
        except OSError as exc:
            raise os_error("cannot quarantine", key, exc, "delete") from exc
        return str(target)

    def touch(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            try:
                os.utime(self.path_of(key))
            except OSError as exc:
                raise os_error("cannot touch", key, exc, "touch") from exc


async def _read_fd(fd: int, offset: int, length: int | None, path: Path) -> AsyncIterator[bytes]:
    try:
        end = None if length is None else offset + length
        pos = offset
        while end is None or pos < end:
            want = CHUNK if end is None else min(CHUNK, end - pos)
            try:
                data = os.pread(fd, want, pos)
            except OSError as exc:
                raise os_error("cannot read", path, exc, "read") from exc
            if not data:
                break
            pos += len(data)
            yield data
    finally:
        os.close(fd)


def _log_walk_error(exc: OSError) -> None:
    log.error("cannot read cache directory path=%s error=%s", exc.filename, exc.strerror)


def remove_stale_temp(tmp_root: Path, *, keep: Path) -> list[tuple[Path, int]]:
    """Remove the temp directories of processes that are gone; return the files and sizes."""
    removed: list[tuple[Path, int]] = []
    try:
        entries = list(tmp_root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry == keep:
            continue
        if entry.is_dir() and not owned_by_live_process(entry):
            with contextlib.suppress(OSError):
                removed.extend((p, p.stat().st_size) for p in entry.iterdir() if p.name != ".lock")
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            with contextlib.suppress(OSError):
                removed.append((entry, entry.stat().st_size))
            entry.unlink(missing_ok=True)
    if removed:
        log.warning("removed temp files left by a previous run count=%d", len(removed))
    return removed


def owned_by_live_process(directory: Path) -> bool:
    """True while the process that made ``directory`` holds the flock on its ``.lock``."""
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


def check_local_dir(tmp_dir: Path, root: Path, min_free: int = 16 * 1024 * 1024) -> list[str]:
    """Problems of a local directory: not writable, disk full."""
    problems = []
    probe = tmp_dir / "ready-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        problems.append(f"storage not writable: {os.strerror(exc.errno or 0)}")
    try:
        st = os.statvfs(root)
    except OSError as exc:
        problems.append(f"storage not readable: {os.strerror(exc.errno or 0)}")
    else:
        free = st.f_bavail * st.f_frsize
        if free < min_free:
            problems.append(f"disk full: {free} bytes free")
    return problems
