"""The local read tier: hot blobs of a remote store kept on this replica's own disk.

Files live under ``<work-dir>/tier/<key>``, bounded by ``max_size`` bytes with least-recently-used
eviction (recency in memory, rebuilt from mtimes at start). Every file in it was verified before
it was placed here (a committed upload, or a read of the store that hashed to its digest), and it
is placed with ``os.replace``, so a crash leaves whole files or none. Losing the directory loses
nothing: the store still holds every object.

The workers of one host (``serve --workers N``) share the directory, each with ``max_size / N``:
a file another worker placed is taken into this one's account when first asked for, so the
accounts together cover every file and the directory stays within ``max_size``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

from storage.base import LocalFile

log = logging.getLogger(__name__)


class LocalTier:
    def __init__(self, root: Path, max_size: int) -> None:
        self.root = root
        self.max_size = max_size
        self.used = 0
        self._files: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first

    def path_of(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def scan(self) -> None:
        """Rebuild the accounting from what is on disk (oldest first)."""
        found = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(path)
                    key = os.path.relpath(path, self.root).replace(os.sep, "/")
                    found.append((st.st_mtime, key, st.st_size))
        found.sort()
        self._files = OrderedDict((key, size) for _, key, size in found)
        self.used = sum(self._files.values())
        self._make_room(0)

    def get(self, key: str) -> LocalFile | None:
        path = self.path_of(key)
        if key not in self._files:
            try:  # placed by another worker of this host?
                size = os.stat(path).st_size
            except OSError:
                return None
            if size > self.max_size:
                return LocalFile(path, size)
            self._make_room(size)
            self._files[key] = size
            self.used += size
            return LocalFile(path, size)
        try:
            size = os.stat(path).st_size
        except OSError:
            self._forget(key)
            return None
        self._files.move_to_end(key)
        return LocalFile(path, size)

    def adopt(self, spool: Path, key: str, size: int) -> Path | None:
        """Move a verified file in; None (and the file removed) if it cannot fit."""
        if size > self.max_size:
            spool.unlink(missing_ok=True)
            return None
        self._make_room(size)
        final = self.path_of(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spool, final)
        except OSError as exc:
            log.error("cannot place a blob in the local tier key=%s error=%s", key, exc)
            spool.unlink(missing_ok=True)
            return None
        self._forget(key)
        self._files[key] = size
        self.used += size
        return final

    def remove(self, key: str) -> None:
        if key in self._files:
            self.path_of(key).unlink(missing_ok=True)
            self._forget(key)

    def _forget(self, key: str) -> None:
        size = self._files.pop(key, None)
        if size is not None:
            self.used -= size

    def _make_room(self, size: int) -> None:
        while self._files and self.used + size > self.max_size:
            key = next(iter(self._files))
            # A reader that has the file open keeps reading it (POSIX).
            self.path_of(key).unlink(missing_ok=True)
            self._forget(key)
