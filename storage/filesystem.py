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
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from storage.base import LocalFile, ObjectInfo
from storage.errors import StorageError
from storage.tempdir import ProcessTemp
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
        self.temp = ProcessTemp(self.root / "tmp", self.instance)
        #: Where this process's writes spool (``tmp/<instance>/``).
        self.tmp_dir = self.temp.path
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
        """Create the tree, claim a temp directory and remove what dead processes left
        (``storage.tempdir``)."""
        try:
            for sub in ("blobs", "manifests", "repositories"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.temp.claim()
        except OSError as exc:
            raise os_error("cannot prepare storage directory", self.root, exc, "open") from exc
        self.leftovers = self.temp.remove_dead()

    async def close(self) -> None:
        self.temp.release()

    async def check_ready(self) -> list[str]:
        return self.temp.check(self.root)

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
