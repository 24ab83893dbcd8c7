"""The worker processes of one host (``regproxy serve --workers N``) as one cache, without Redis.

The parent makes a run directory (a fresh temporary directory per ``serve``) and every worker
opens it::

    <run>/locks             one byte-range lock per blob being downloaded (Linux "open file
                            description" locks: the kernel drops them when their holder dies)
    <run>/inflight/<digest> the owner's record: who, its loopback URL, upstream, repository
    <run>/used              the host's bytes in use (8 bytes, read through mmap by everyone)
    <run>/flights           one byte-range lock per manifest fetch or tag revalidation under way
    <run>/windows           failed logins per client address (:class:`HostWindows`)

:class:`HostCoordinator` has :class:`storage.redis.RedisCoordinator`'s interface, so the fleet's
single flight (``proxy.fetch.fleet``) runs on it unchanged: the worker that takes a blob's lock
fetches it, the others follow it over loopback HTTP (each worker listens on its own
``127.0.0.1`` port for that) or read the committed blob. A lock cannot outlive its worker (no
TTL to wait out): a follower of a worker that died takes the lock over at once.

:class:`HostFlight` does the same for manifests: one worker asks upstream for a manifest or a
tag, the others wait for its answer in the store (Docker Hub counts manifest GETs).

:class:`HostCounter` is the cache's size accounting shared by the workers (see
``storage.eviction``): every commit adds to it, the one worker that evicts sets it after each
listing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.redis import BlobLock

#: ``struct flock`` on Linux (x86-64 and arm64): type, whence, start, len, pid.
_FLOCK = "hhqqi4x"


def _flock(kind: int, start: int, length: int = 1) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)


def _offset(digest: str) -> int:
    """The byte of the lock file that stands for ``digest`` (56 bits: no collision in practice)."""
    return int.from_bytes(hashlib.sha256(digest.encode()).digest()[:7], "big")


def _busy(exc: OSError) -> bool:
    return exc.errno in (errno.EAGAIN, errno.EACCES)


class HostCoordinator:
    """Single flight for blob downloads across the workers of one host; see the module doc."""

    def __init__(self, run_dir: Path, *, token: str) -> None:
        self.dir = Path(run_dir)
        self.token = token
        (self.dir / "inflight").mkdir(exist_ok=True)
        self._locks = HostFlight(self.dir / "locks")
        #: Who holds a lock, in its record (``BlobLock.owner``).
        self.instance = f"pid{os.getpid()}"

    def close(self) -> None:
        self._locks.close()

    async def acquire(
        self, digest: str, url: str = "", upstream: str = "", repository: str = ""
    ) -> bool | None:
        """True: this worker owns the download (reachable at ``url``); False: another download
        holds it."""
        if not self._locks.take(digest):
            return False
        record = {"owner": self.instance, "url": url}
        record.update(upstream=upstream, repository=repository)
        path = self.dir / "inflight" / _name(digest)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(record))
        os.replace(scratch, path)
        return True

    async def refresh(self, digest: str) -> bool:
        """Nothing to renew: the lock lives as long as its holder."""
        return self._locks.holds(digest)

    async def release(self, digest: str) -> None:
        if not self._locks.holds(digest):
            return
        # the record first: once unlocked, a new owner's record must not be removed by us
        (self.dir / "inflight" / _name(digest)).unlink(missing_ok=True)
        self._locks.drop(digest)

    async def release_dead(self, digest: str, lock: BlobLock) -> bool:
        """The lock of a worker that died is gone with it: True when nobody holds it."""
        return not await self.locked(digest)

    async def inflight(self, digest: str) -> BlobLock | None:
        """The worker holding the lock, and where it serves peers (None: nobody holds it)."""
        if not await self.locked(digest):
            return None
        try:
            raw = (self.dir / "inflight" / _name(digest)).read_bytes()
            info = json.loads(raw)
            return BlobLock(
                raw,
                str(info.get("owner") or ""),
                str(info.get("url") or ""),
                str(info.get("upstream") or ""),
                str(info.get("repository") or ""),
            )
        except (OSError, ValueError):
            return BlobLock(b"", "", "", "", "")  # locked, its record not written yet

    async def lock_ttl(self, digest: str) -> int | None:
        """None: a host's lock never expires (it goes with its holder)."""
        return None

    async def locked(self, digest: str) -> bool:
        return self._locks.anyone_holds(digest)

    async def peer_token(self) -> str | None:
        return self.token

    async def accessed(self, digests: dict[str, float]) -> None:
        """Access times need no sharing on one host: the filesystem's mtimes carry them."""

    async def access_times(self) -> dict[str, float]:
        return {}


class HostFlight:
    """:class:`storage.base.Flight` among the workers of a host: a byte-range lock per key in one
    file (``<run>/flights``: a manifest fetch, a tag's revalidation; :class:`HostCoordinator`'s
    blob locks are another), dropped by the kernel with its holder, so a follower of a worker
    that died does the work itself at once."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._probe = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._held: dict[str, int] = {}  # key -> descriptor whose lock we hold

    def holds(self, key: str) -> bool:
        """This process holds ``key``."""
        return key in self._held

    def take(self, key: str) -> bool:
        """Hold ``key``; False when this process or another one already holds it."""
        if key in self._held:
            return False
        fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, _offset(key)))
        except OSError as exc:
            os.close(fd)
            if _busy(exc):
                return False
            raise
        self._held[key] = fd
        return True

    def drop(self, key: str) -> bool:
        """Let ``key`` go; False when this process did not hold it."""
        fd = self._held.pop(key, None)
        if fd is None:
            return False
        os.close(fd)
        return True

    def anyone_holds(self, key: str) -> bool:
        """This process or another one holds ``key``."""
        if key in self._held:
            return True
        probe = _flock(fcntl.F_WRLCK, _offset(key))
        answer = fcntl.fcntl(self._probe, fcntl.F_OFD_GETLK, probe)
        kind: int = struct.unpack(_FLOCK, answer)[0]
        return kind != fcntl.F_UNLCK

    async def lead(self, key: str) -> bool | None:
        return self.take(key)

    async def land(self, key: str) -> None:
        self.drop(key)

    async def landed(self, key: str) -> bool:
        return not self.anyone_holds(key)

    def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
        os.close(self._probe)


class HostWindows:
    """Counts per key in fixed windows, shared by the workers of a host (``<run>/windows``): the
    login throttle's failed logins without Redis (``proxy.access.throttle``).

    A table of ``SLOTS`` entries (a 64-bit hash of the key, its count, the end of its window on
    ``CLOCK_MONOTONIC``, which every process of the host reads alike) in a shared mapping, under a
    lock on the file. A key lives in one of ``PROBE`` slots from its hash; when all of them hold
    live windows of other keys, the one that ends first gives way (as a single process's table
    drops the oldest windows first when it is full).
    """

    SLOTS = 4096
    PROBE = 16
    _ENTRY = struct.Struct("Qqd")

    def __init__(self, path: Path) -> None:
        self._fd, self._map = _mapped(path, self.SLOTS * self._ENTRY.size)

    def add(self, key: str, window: float) -> tuple[int, float]:
        """Count one for ``key``; (its count, its window's end) after that."""
        mark, now = _mark(key), time.monotonic()
        with _locked(self._fd):
            slot, count, end = self._find(mark, now)
            count, end = (count + 1, end) if count else (1, now + window)
            self._ENTRY.pack_into(self._map, slot * self._ENTRY.size, mark, count, end)
        return count, end

    def get(self, key: str) -> tuple[int, float]:
        """(count, end of window) of ``key``'s live window; (0, 0.0) when it has none."""
        with _locked(self._fd):
            _, count, end = self._find(_mark(key), time.monotonic())
        return count, end

    def _find(self, mark: int, now: float) -> tuple[int, int, float]:
        """``mark``'s slot with its live count and end, else a free slot with (0, 0.0)."""
        free = None
        first = mark % self.SLOTS
        for i in range(self.PROBE):
            slot = (first + i) % self.SLOTS
            held, count, end = self._ENTRY.unpack_from(self._map, slot * self._ENTRY.size)
            if end <= now:  # empty or over
                free = slot if free is None else free
            elif held == mark:
                return slot, count, end
        if free is None:
            slots = [(first + i) % self.SLOTS for i in range(self.PROBE)]
            size = self._ENTRY.size
            free = min(slots, key=lambda s: self._ENTRY.unpack_from(self._map, s * size)[2])
        return free, 0, 0.0

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _mapped(path: Path, size: int) -> tuple[int, mmap.mmap]:
    """``path`` (made ``size`` bytes long if shorter) open and mapped shared."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def _mark(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    """The whole file, between the processes of the host (a few microseconds at a time)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, 0, 0))
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, 0, 0))


def _name(digest: str) -> str:
    return digest.replace(":", "-").replace("/", "_")


class HostCounter:
    """One signed 64-bit number shared by the workers of a host (``<run>/used``)."""

    def __init__(self, path: Path) -> None:
        self._fd, self._map = _mapped(path, 8)

    @property
    def value(self) -> int:
        value: int = struct.unpack_from("q", self._map, 0)[0]
        return value

    def set(self, value: int) -> int:
        with _locked(self._fd):
            struct.pack_into("q", self._map, 0, value)
        return value

    def add(self, delta: int) -> int:
        with _locked(self._fd):
            value = self.value + delta
            struct.pack_into("q", self._map, 0, value)
        return value

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


@dataclass(frozen=True)
class Worker:
    """One worker process of a host: which, of how many, and what they share."""

    index: int
    count: int
    #: The run directory of ``serve`` (locks, records, the shared size, metrics files).
    run_dir: Path
    #: The secret of peer requests between the workers.
    token: str
    #: Where the other workers reach this one: ``http://127.0.0.1:PORT``.
    peer_url: str

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"


class HostOverFleet:
    """With Redis and workers: this host's lock first (one worker of a host contends for the
    fleet's), then the fleet's (:class:`storage.redis.RedisCoordinator`). A worker follows a
    worker of its own host over loopback, another replica at its advertised URL; a worker that
    loses the fleet's lock lets go of the host's, so its neighbours follow that replica too.
    Redis away: the host's lock alone decides, as without Redis."""

    def __init__(self, fleet: Any, host: HostCoordinator, local_url: str) -> None:
        self.fleet = fleet
        self.host = host
        self.local_url = local_url
        self._fleet_held: set[str] = set()

    @property
    def instance(self) -> str:
        return str(self.fleet.instance)

    async def acquire(
        self, digest: str, url: str = "", upstream: str = "", repository: str = ""
    ) -> bool | None:
        if not await self.host.acquire(digest, self.local_url, upstream, repository):
            return False
        owned = await self.fleet.acquire(digest, url, upstream, repository)
        if owned is False:
            await self.host.release(digest)
            return False
        if owned:
            self._fleet_held.add(digest)
        return True

    async def refresh(self, digest: str) -> bool:
        if digest not in self._fleet_held:
            return await self.host.refresh(digest)  # Redis was away: the host's lock alone
        if await self.fleet.refresh(digest):
            return True
        # the fleet's lock is lost: let go of the host's, so the neighbours follow its new owner
        self._fleet_held.discard(digest)
        await self.host.release(digest)
        return False

    async def release(self, digest: str) -> None:
        self._fleet_held.discard(digest)
        await self.fleet.release(digest)
        await self.host.release(digest)

    async def release_dead(self, digest: str, lock: BlobLock) -> bool:
        if await self.host.locked(digest):
            return False  # a worker of this host holds it: it lives
        return bool(await self.fleet.release_dead(digest, lock))

    async def local_owner(self, digest: str) -> str | None:
        """The loopback URL of the worker of this host downloading ``digest``, if one is."""
        info = await self.host.inflight(digest)
        return None if info is None else info.url or None

    async def inflight(self, digest: str) -> BlobLock | None:
        info = await self.host.inflight(digest)
        if info is not None:
            return info
        result: BlobLock | None = await self.fleet.inflight(digest)
        return result

    async def lock_ttl(self, digest: str) -> int | None:
        if await self.host.locked(digest):
            return None
        ttl: int | None = await self.fleet.lock_ttl(digest)
        return ttl

    async def locked(self, digest: str) -> bool:
        return await self.host.locked(digest) or bool(await self.fleet.locked(digest))

    async def peer_token(self) -> str | None:
        token: str | None = await self.fleet.peer_token()
        return token

    async def accessed(self, digests: dict[str, float]) -> None:
        await self.fleet.accessed(digests)

    async def access_times(self) -> dict[str, float]:
        times: dict[str, float] = await self.fleet.access_times()
        return times
