"""A process's own temp directory: ``<root>/tmp/<instance>/``, claimed with ``flock``.

Each process writes its spools into its own directory while holding an ``flock`` on its
``.lock``; a directory whose lock can be taken belongs to a process that is gone (killed,
crashed), so what it left is removed at the next start. Both drivers keep one: the filesystem
driver under its storage root, the S3 driver under its work dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class ProcessTemp:
    """``<parent>/<instance>/``: this process's, for as long as it lives."""

    def __init__(self, parent: Path, instance: str) -> None:
        self.parent = parent
        self.path = parent / instance
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Create and lock the directory (raises OSError)."""
        self.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        self._lock_fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        """Remove the directory and drop the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def dead(self) -> list[Path]:
        """The directories of processes that are gone."""
        try:
            entries = list(self.parent.iterdir())
        except OSError:
            return []
        return [
            e for e in entries if e != self.path and e.is_dir() and not owned_by_live_process(e)
        ]

    def remove_dead(self) -> list[tuple[Path, int]]:
        """Remove what processes that are gone left; return the files and their sizes."""
        removed: list[tuple[Path, int]] = []
        for entry in self.dead():
            with contextlib.suppress(OSError):
                removed.extend((p, p.stat().st_size) for p in entry.iterdir() if p.name != ".lock")
            shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            for entry in self.parent.iterdir():
                if entry.is_file():  # not a process's: nothing writes files here directly
                    with contextlib.suppress(OSError):
                        removed.append((entry, entry.stat().st_size))
                    entry.unlink(missing_ok=True)
        if removed:
            log.warning("removed temp files left by a previous run count=%d", len(removed))
        return removed

    def check(self, volume: Path, min_free: int = 16 * 1024 * 1024) -> list[str]:
        """Problems of the local disk: not writable, full."""
        problems = []
        probe = self.path / "ready-probe"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ok")
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError as exc:
            problems.append(f"storage not writable: {os.strerror(exc.errno or 0)}")
        try:
            st = os.statvfs(volume)
        except OSError as exc:
            problems.append(f"storage not readable: {os.strerror(exc.errno or 0)}")
        else:
            free = st.f_bavail * st.f_frsize
            if free < min_free:
                problems.append(f"disk full: {free} bytes free")
        return problems


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
