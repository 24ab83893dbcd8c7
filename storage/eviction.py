"""Size accounting and least-recently-used eviction, in the background, on any driver.

* ``used`` is rebuilt from a listing of the store at start (a directory scan, or a bucket
  listing) and again on every eviction pass, so a crash or another replica writing the same store
  cannot leave it wrong for long; commits add to it in between.
* Recency is the latest of: the object's mtime (the filesystem driver touches a file when it is
  served, at most once a minute, so the order survives restarts), this process's own record of
  uses, and — with Redis — every replica's (``regproxy:access``). Object stores keep no access
  time, so on S3 without Redis a restart forgets recency back to the upload time.
* With Redis, what a pass removes leaves ``regproxy:access`` too, and so does any member whose
  content the listing no longer shows (``UNLISTED_GRACE``); a pass reads the set a page at a
  time and keeps only the times of listed content.
* A pass runs every ``interval`` seconds and at once when ``used`` crosses the high watermark. It
  removes the least recently used content until ``used`` is under the low watermark, and all that
  was unused for ``blob_ttl`` when that is set. It never removes a pinned image's manifests or
  blobs, nor a blob a client is being sent right now (``in_use``).
* A pull that already opened a file keeps reading it after deletion (POSIX); the next request for
  an evicted digest simply fetches it again.

Workers of one host (``serve --workers N``) share ``used`` through a
:class:`storage.host.HostCounter` and only one of them (the ``accountant``) lists and evicts; it
looks at the shared figure every second, so another worker's commits wake it as its own do. A
blob another worker is sending right now is not in the accountant's ``in_use``: if evicted, that
client keeps reading the open file (POSIX).

What it does not promise: several replicas each run passes; they agree on the content (the listing
is the truth) but may each remove a little more than needed. Listing a large bucket on every pass
costs one request per 1,000 objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.content import Content, ContentStore, parse_tag
from storage.errors import StorageError
from storage.settings import CacheSettings

if TYPE_CHECKING:
    from storage.host import HostCounter
    from storage.redis import RedisCoordinator

log = logging.getLogger(__name__)

TOUCH_EVERY = 60.0
#: A shared access time of content the listing does not show is dropped once it is this old
#: (a listing may lag behind fresh writes; anything older was evicted, purged or collected).
UNLISTED_GRACE = 600.0


@dataclass
class EvictionReport:
    used_before: int = 0
    used_after: int = 0
    removed: dict[str, int] = field(default_factory=lambda: {"blob": 0, "manifest": 0})
    freed: int = 0
    pinned: int = 0
    #: Digests of what was removed.
    digests: list[str] = field(default_factory=list)


async def pinned_digests(store: ContentStore, pins: tuple[str, ...]) -> set[str]:
    """Digests of the manifests, children and blobs of every cached tag matching a pin glob.

    A pin is ``[upstream/]repository:tag`` with globs; without an upstream it matches any.
    """
    pinned: set[str] = set()
    if not pins:
        return pinned
    for record in await store.list_tags():
        names = (
            f"{record.repository}:{record.tag}",
            f"{record.upstream}/{record.repository}:{record.tag}",
        )
        if not any(fnmatch.fnmatchcase(n, pin) for n in names for pin in pins):
            continue
        raw = await store.get_record(record.upstream, record.repository, "tags", record.tag)
        entry = parse_tag(raw) if raw is not None else None
        if entry is not None:
            await store.reachable(entry.digest, pinned)
    return pinned


class CacheManager:
    """Keeps the cache within ``cache.max_size``; see the module docstring.

    ``on_size``, ``on_evict`` and ``on_error`` let the proxy count what it does (metrics,
    console) without this package knowing about them.
    """

    def __init__(
        self,
        store: ContentStore,
        config: CacheSettings,
        *,
        interval: float = 60.0,
        shared: HostCounter | None = None,
        accountant: bool = True,
    ) -> None:
        self.store = store
        self.config = config
        self.limit = config.max_size
        self.interval = interval
        #: The host's figure, shared by its workers; None: this process's own (``_used``).
        self.shared = shared
        #: This process lists and evicts (one worker of a host does).
        self.accountant = accountant
        self._used = 0
        #: Digests being sent to a client right now; never evicted.
        self.in_use: Counter[str] = Counter()
        #: Called with the bytes in use whenever that changes.
        self.on_size: Callable[[int], None] | None = None
        #: Called with (kind, digest, size) of every evicted blob or manifest.
        self.on_evict: Callable[[str, str, int], None] | None = None
        #: Called with the operation of a failed removal.
        self.on_error: Callable[[str], None] | None = None
        self._used_at: dict[str, float] = {}  # digest -> last use (unix time), this process
        self._touched: dict[str, float] = {}  # digest -> monotonic time of the last store touch
        #: Shared access times (Redis) across replicas; None: this process's only.
        self.coordinator: RedisCoordinator | None = None
        self._pending_access: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        #: Recent commits (digest -> (time, size)): a listing made meanwhile, or an object
        #: store's listing that lags behind its writes, may not show them yet (``_unlisted``).
        self._recent: dict[str, tuple[float, int]] = {}
        store.on_commit = self.added
        store.on_access = self.touch

    @property
    def used(self) -> int:
        return self._used if self.shared is None else max(0, self.shared.value)

    @property
    def full(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    @property
    def bounded(self) -> bool:
        return self.limit is not None or self.config.blob_ttl is not None

    async def start(self) -> None:
        if not self.accountant:
            return
        files = await self.store.list_content()
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
        if self.shared is None:
            self._used = max(0, value)
        else:
            self.shared.set(max(0, value))
        if self.on_size is not None:
            self.on_size(self.used)

    def _over_high(self) -> bool:
        return self.limit is not None and self.used > self.limit * self.config.high_watermark

    def added(self, digest: str, size: int) -> None:
        """A blob or manifest of ``size`` bytes was committed."""
        self._recent[digest] = (time.time(), size)
        if self.shared is None:
            self._set_used(self.used + size)
        else:
            self.shared.add(size)
            if self.on_size is not None:
                self.on_size(self.used)
        if self._over_high():
            self._wake.set()

    def touch(self, kind: str, digest: str) -> None:
        """Mark content used now (for LRU order); the store hears of it once a minute at most."""
        self._used_at[digest] = time.time()
        if len(self._used_at) > 1_000_000:
            self._used_at.clear()
        now = time.monotonic()
        if now - self._touched.get(digest, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._touched[digest] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        if self.coordinator is not None:
            self._pending_access[digest] = time.time()
        self.store.touch(kind, digest)

    async def _loop(self) -> None:
        while True:
            await self._sleep()
            self._wake.clear()
            try:
                await self.evict()
            except Exception:
                log.exception("eviction pass failed")
                await asyncio.sleep(1)

    async def _sleep(self) -> None:
        """Until woken or ``interval`` passed; with a shared figure, also until it is over the
        high watermark (another worker's commits)."""
        deadline = time.monotonic() + self.interval
        while True:
            left = deadline - time.monotonic()
            step = left if self.shared is None else min(left, 1.0)
            if step <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), step)
                return
            if self.shared is not None and self._over_high():
                return

    async def evict(self) -> EvictionReport:
        """One pass: list, then remove LRU content down to the low watermark (and expired)."""
        async with self._lock:
            started = time.time()
            files = await self.store.list_content()
            shared: dict[str, float] = {}
            if self.coordinator is not None:
                pending, self._pending_access = self._pending_access, {}
                await self.coordinator.accessed(pending)
                shared = await self.coordinator.access_times(
                    {f.digest for f in files}, stale_before=started - UNLISTED_GRACE
                )
            protected = await pinned_digests(self.store, self.config.pin)
            protected |= {d for d, n in self.in_use.items() if n > 0}
            report = await self._evict(files, shared, protected)
            if self.coordinator is not None:
                await self.coordinator.forget(report.digests, before=started)
            unlisted = self._unlisted(files)
            self._set_used(report.used_after + unlisted)
        if unlisted and self._over_high():
            # content the listing did not show yet: look again soon (not in a tight loop)
            asyncio.get_running_loop().call_later(1.0, self._wake.set)
        if report.freed:
            log.info(
                "evicted files=%d freed=%d used=%d limit=%s",
                sum(report.removed.values()),
                report.freed,
                report.used_after,
                self.limit,
            )
        return report

    def _unlisted(self, files: list[Content]) -> int:
        """Bytes committed in the last half minute that the listing does not show (removed
        ones are forgotten when removed; one removed by another replica is overcounted until
        then, which at worst evicts a little early)."""
        listed = {f.digest for f in files}
        cutoff = time.time() - 30
        self._recent = {d: v for d, v in self._recent.items() if v[0] >= cutoff}
        return sum(size for d, (_, size) in self._recent.items() if d not in listed)

    async def _evict(
        self, files: list[Content], shared: dict[str, float], protected: set[str]
    ) -> EvictionReport:
        def last_use(item: Content) -> float:
            # another replica, or this process, may have used it since it was written
            return max(item.mtime, shared.get(item.digest, 0.0), self._used_at.get(item.digest, 0))

        report = EvictionReport()
        report.used_before = used = sum(f.size for f in files)
        target = None if self.limit is None else int(self.limit * self.config.low_watermark)
        expire_before = (
            time.time() - self.config.blob_ttl if self.config.blob_ttl is not None else None
        )
        must_shrink = self.limit is not None and used > self.limit * self.config.high_watermark
        for item in sorted(files, key=last_use):  # oldest first
            expired = expire_before is not None and last_use(item) < expire_before
            over = must_shrink and target is not None and used > target
            if not (expired or over):
                break  # sorted by last use: nothing later is expired, and `used` only shrinks
            if item.digest in protected:
                report.pinned += 1
                continue
            if await self._remove(item):
                used -= item.size
                report.freed += item.size
                report.removed[item.kind] += 1
                report.digests.append(item.digest)
        if must_shrink and target is not None and used > target:
            log.warning(
                "cannot evict below the low watermark: the rest is pinned or in use "
                "used=%d target=%d",
                used,
                target,
            )
        report.used_after = used
        return report

    async def _remove(self, item: Content) -> bool:
        try:
            if item.kind == "manifest":
                found = await self.store.delete_manifest(item.digest)
            else:
                found = await self.store.delete_blob(item.digest)
        except StorageError as exc:
            log.error("cannot evict digest=%s error=%s", item.digest, exc)
            if self.on_error is not None:
                self.on_error("evict")
            return False
        self._used_at.pop(item.digest, None)
        self._recent.pop(item.digest, None)
        if found and self.on_evict is not None:
            self.on_evict(item.kind, item.digest, item.size)
        return found
