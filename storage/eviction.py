"""Size accounting and least-recently-used eviction, in the background.

* ``used`` is rebuilt from disk at start (a scan of ``blobs/`` and ``manifests/``) and again on
  every eviction pass, so a crash or another process writing the same volume cannot leave it wrong
  for long; commits add to it in between.
* Recency is the file's mtime: serving a blob or manifest touches it (at most once a minute per
  file), so the order survives restarts without any other record.
* A pass runs every ``interval`` seconds and at once when ``used`` crosses the high watermark. It
  removes the least recently used files until ``used`` is under the low watermark, and every file
  unused for ``blob_ttl`` when that is set. It never removes a pinned image's manifests or blobs,
  nor a blob a client is being sent right now (``in_use``).
* Deletion runs in a thread, never on a request's path. A pull that already opened a file keeps
  reading it after deletion (POSIX); the next request for an evicted digest simply fetches it again.

What it does not promise: several replicas sharing a volume each run passes; they agree on the
files (the scan is the truth) but may each remove a little more than needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import CacheConfig
from storage.filesystem import content_path

if TYPE_CHECKING:
    from proxy.metrics import Metrics
    from storage.filesystem import FilesystemStorage
    from storage.redis import RedisCoordinator

log = logging.getLogger(__name__)

TOUCH_EVERY = 60.0
INDEX_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)


@dataclass(order=True, slots=True)
class _File:
    mtime: float
    size: int
    kind: str = field(compare=False)  # "blob" | "manifest"
    digest: str = field(compare=False)
    path: Path = field(compare=False)


@dataclass
class EvictionReport:
    used_before: int = 0
    used_after: int = 0
    removed: dict[str, int] = field(default_factory=lambda: {"blob": 0, "manifest": 0})
    freed: int = 0
    pinned: int = 0


def _entries(path: str) -> list[os.DirEntry[str]]:
    """A directory's entries; an unreadable directory is logged and skipped, not fatal."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.error("cannot read cache directory path=%s error=%s", path, exc.strerror)
        return []


def scan(root: Path) -> list[_File]:
    """Every committed blob and manifest under ``root`` with its size and mtime."""
    files = []
    for kind, top in (("blob", root / "blobs"), ("manifest", root / "manifests")):
        for algorithm in _entries(str(top)):
            if not algorithm.is_dir():
                continue
            for prefix in _entries(algorithm.path):
                if not prefix.is_dir():
                    continue
                for entry in _entries(prefix.path):
                    if entry.name.endswith(".type") or not entry.is_file():
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat()
                        files.append(
                            _File(
                                st.st_mtime,
                                st.st_size,
                                kind,
                                f"{algorithm.name}:{entry.name}",
                                Path(entry.path),
                            )
                        )
    return files


def pinned_digests(root: Path, pins: tuple[str, ...]) -> set[str]:
    """Digests of the manifests, children and blobs of every cached tag matching a pin glob.

    A pin is ``[upstream/]repository:tag`` with globs; without an upstream it matches any.
    """
    if not pins:
        return set()
    pinned: set[str] = set()
    repos = root / "repositories"
    if not repos.is_dir():
        return pinned
    for tag_file in repos.glob("**/_tags/*"):
        parts = tag_file.relative_to(repos).parts
        upstream, repository, tag = parts[0], "/".join(parts[1:-2]), parts[-1]
        names = (f"{repository}:{tag}", f"{upstream}/{repository}:{tag}")
        if not any(fnmatch.fnmatchcase(n, pin) for n in names for pin in pins):
            continue
        with contextlib.suppress(OSError, ValueError):
            _collect(root, json.loads(tag_file.read_text())["digest"], pinned)
    return pinned


def _collect(root: Path, digest: str, into: set[str], depth: int = 0) -> None:
    into.add(digest)
    path = content_path(root, "manifests", digest)
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return
    for child in doc.get("manifests") or []:
        if isinstance(child, dict) and child.get("digest") and depth < 2:
            _collect(root, child["digest"], into, depth + 1)
    for blob in [doc.get("config") or {}, *(doc.get("layers") or [])]:
        if isinstance(blob, dict) and blob.get("digest"):
            into.add(blob["digest"])


class CacheManager:
    """Keeps the cache within ``cache.max_size``; see the module docstring."""

    def __init__(
        self,
        storage: FilesystemStorage,
        config: CacheConfig,
        *,
        metrics: Metrics | None = None,
        interval: float = 60.0,
    ) -> None:
        self.storage = storage
        self.root = storage.root
        self.config = config
        self.limit = config.max_size
        self.metrics = metrics
        self.interval = interval
        self.used = 0
        #: Digests being sent to a client right now; never evicted.
        self.in_use: Counter[str] = Counter()
        self._touched: dict[str, float] = {}
        #: Shared access times (Redis) across replicas; None: file mtimes only.
        self.coordinator: RedisCoordinator | None = None
        self._pending_access: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        if metrics is not None:
            metrics.storage_limit.set(self.limit or 0)
        storage.on_commit = self.added
        storage.on_access = self.touch
        if metrics is not None:
            storage.on_error = lambda op: metrics.storage_errors.labels(op).inc()

    @property
    def full(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    @property
    def bounded(self) -> bool:
        return self.limit is not None or self.config.blob_ttl is not None

    async def start(self) -> None:
        files = await asyncio.to_thread(scan, self.root)
        self._set_used(sum(f.size for f in files))
        log.info(
            "cache accounting rebuilt bytes=%d files=%d limit=%s", self.used, len(files), self.limit
        )
        if self.bounded:
            self._task = asyncio.create_task(self._loop())
            if self._over_high():
                self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set_used(self, value: int) -> None:
        self.used = max(0, value)
        if self.metrics is not None:
            self.metrics.storage_bytes.set(self.used)

    def _over_high(self) -> bool:
        return self.limit is not None and self.used > self.limit * self.config.high_watermark

    def added(self, size: int) -> None:
        """A blob or manifest of ``size`` bytes was committed."""
        self._set_used(self.used + size)
        if self._over_high():
            self._wake.set()

    def touch(self, path: Path, digest: str) -> None:
        """Mark a file used now (for LRU order), at most once a minute per file."""
        now = time.monotonic()
        if now - self._touched.get(digest, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._touched[digest] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        if self.coordinator is not None:
            self._pending_access[digest] = time.time()
        with contextlib.suppress(FileNotFoundError):
            try:
                os.utime(path)
            except OSError as exc:
                log.error("cannot touch cached file path=%s error=%s", path, exc)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.evict()
            except Exception:
                log.exception("eviction pass failed")
                await asyncio.sleep(1)

    async def evict(self) -> EvictionReport:
        """One pass: rescan, then remove LRU files down to the low watermark (and expired ones)."""
        async with self._lock:
            in_use = {d for d, n in self.in_use.items() if n > 0}
            shared: dict[str, float] = {}
            if self.coordinator is not None:
                pending, self._pending_access = self._pending_access, {}
                await self.coordinator.accessed(pending)
                shared = await self.coordinator.access_times()
            report = await asyncio.to_thread(self._evict_sync, in_use, shared)
        self._set_used(report.used_after)
        if self.metrics is not None:
            for kind, count in report.removed.items():
                self.metrics.evictions.labels(kind).inc(count)
        if report.freed:
            log.info(
                "evicted files=%d freed=%d used=%d limit=%s",
                sum(report.removed.values()),
                report.freed,
                report.used_after,
                self.limit,
            )
        return report

    def _evict_sync(self, in_use: set[str], shared: dict[str, float]) -> EvictionReport:
        files = scan(self.root)
        for item in files:  # another replica may have served it more recently
            item.mtime = max(item.mtime, shared.get(item.digest, 0.0))
        report = EvictionReport()
        report.used_before = used = sum(f.size for f in files)
        protected = pinned_digests(self.root, self.config.pin) | in_use
        target = None if self.limit is None else int(self.limit * self.config.low_watermark)
        expire_before = (
            time.time() - self.config.blob_ttl if self.config.blob_ttl is not None else None
        )
        must_shrink = self.limit is not None and used > self.limit * self.config.high_watermark
        for item in sorted(files):  # oldest first
            expired = expire_before is not None and item.mtime < expire_before
            over = must_shrink and target is not None and used > target
            if not (expired or over):
                break  # sorted by mtime: nothing later is expired, and `used` only shrinks
            if item.digest in protected:
                report.pinned += 1
                continue
            if self._remove(item):
                used -= item.size
                report.freed += item.size
                report.removed[item.kind] += 1
        if must_shrink and target is not None and used > target:
            log.warning(
                "cannot evict below the low watermark: the rest is pinned or in use "
                "used=%d target=%d",
                used,
                target,
            )
        report.used_after = used
        return report

    def _remove(self, item: _File) -> bool:
        try:
            item.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot evict path=%s error=%s", item.path, exc)
            if self.metrics is not None:
                self.metrics.storage_errors.labels("evict").inc()
            return False
        if item.kind == "manifest":
            item.path.with_name(item.path.name + ".type").unlink(missing_ok=True)
        return True
