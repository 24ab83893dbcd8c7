"""The worker processes of one host (``regproxy serve --workers N``) as one cache, without Redis.

The parent makes a run directory (a fresh temporary directory per ``serve``) and every worker
opens it::

    <run>/locks             one byte-range lock per blob being downloaded (Linux "open file
                            description" locks: the kernel drops them when their holder dies)
    <run>/inflight/<digest> the owner's record: its loopback URL, size, upstream, repository
    <run>/used              the host's bytes in use (8 bytes, read through mmap by everyone)

:class:`HostCoordinator` has :class:`storage.redis.RedisCoordinator`'s interface, so the fleet's
single flight (``proxy.fetch.fleet``) runs on it unchanged: the worker that takes a blob's lock
fetches it, the others follow it over loopback HTTP (each worker listens on its own
``127.0.0.1`` port for that) or read the committed blob. A lock cannot outlive its worker (no
TTL to wait out): a follower of a worker that died takes the lock over at once.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        self._path = self.dir / "locks"
        self._probe = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._held: dict[str, int] = {}  # digest -> descriptor whose lock we hold

    def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
        os.close(self._probe)

    async def acquire(self, digest: str) -> bool | None:
        """True: this worker owns the download; False: another download holds it."""
        if digest in self._held:
            return False
        fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, _offset(digest)))
        except OSError as exc:
            os.close(fd)
            if _busy(exc):
                return False
            raise
        self._held[digest] = fd
        return True

    async def refresh(self, digest: str) -> None:
        """Nothing to do: the lock lives as long as its holder."""

    async def release(self, digest: str) -> None:
        fd = self._held.pop(digest, None)
        if fd is None:
            return
        # the record first: once unlocked, a new owner's record must not be removed by us
        (self.dir / "inflight" / _name(digest)).unlink(missing_ok=True)
        os.close(fd)

    async def publish(
        self, digest: str, url: str, size: int | None, upstream: str, repository: str
    ) -> None:
        record = {"url": url, "size": size, "upstream": upstream, "repository": repository}
        path = self.dir / "inflight" / _name(digest)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(record))
        os.replace(scratch, path)

    async def inflight(self, digest: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads((self.dir / "inflight" / _name(digest)).read_text())
        except (OSError, ValueError):
            return None
        return info

    async def locked(self, digest: str) -> bool:
        if digest in self._held:
            return True
        probe = _flock(fcntl.F_WRLCK, _offset(digest))
        answer = fcntl.fcntl(self._probe, fcntl.F_OFD_GETLK, probe)
        kind: int = struct.unpack(_FLOCK, answer)[0]
        return kind != fcntl.F_UNLCK

    async def peer_token(self) -> str | None:
        return self.token

    async def accessed(self, digests: dict[str, float]) -> None:
        """Access times need no sharing on one host: the filesystem's mtimes carry them."""

    async def access_times(self) -> dict[str, float]:
        return {}


def _name(digest: str) -> str:
    return digest.replace(":", "-").replace("/", "_")


class HostCounter:
    """One signed 64-bit number shared by the workers of a host (``<run>/used``)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < 8:
            os.ftruncate(self._fd, 8)
        self._map = mmap.mmap(self._fd, 8)

    @property
    def value(self) -> int:
        value: int = struct.unpack_from("q", self._map, 0)[0]
        return value

    def set(self, value: int) -> int:
        with self._locked():
            struct.pack_into("q", self._map, 0, value)
        return value

    def add(self, delta: int) -> int:
        with self._locked():
            value = self.value + delta
            struct.pack_into("q", self._map, 0, value)
        return value

    @contextlib.contextmanager
    def _locked(self) -> Any:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, 0, 8))
        try:
            yield
        finally:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, 0, 8))

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

    async def acquire(self, digest: str) -> bool | None:
        if not await self.host.acquire(digest):
            return False
        if await self.fleet.acquire(digest) is False:
            await self.host.release(digest)
            return False
        return True

    async def refresh(self, digest: str) -> None:
        await self.fleet.refresh(digest)

    async def release(self, digest: str) -> None:
        await self.fleet.release(digest)
        await self.host.release(digest)

    async def publish(
        self, digest: str, url: str, size: int | None, upstream: str, repository: str
    ) -> None:
        await self.host.publish(digest, self.local_url, size, upstream, repository)
        await self.fleet.publish(digest, url, size, upstream, repository)

    async def local_owner(self, digest: str) -> str | None:
        """The loopback URL of the worker of this host downloading ``digest``, if one is."""
        if not await self.host.locked(digest):
            return None
        info = await self.host.inflight(digest)
        return None if info is None else str(info.get("url") or "") or None

    async def inflight(self, digest: str) -> dict[str, Any] | None:
        if await self.host.locked(digest):
            info = await self.host.inflight(digest)
            if info is not None:
                return info
        result: dict[str, Any] | None = await self.fleet.inflight(digest)
        return result

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
