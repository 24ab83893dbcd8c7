"""Shared metadata in Redis, so that replicas on one store act as one cache.

:class:`RedisMetadata` keeps tag answers, source mappings and other records in Redis and writes
them through to the store too (a directory or a bucket); reads prefer Redis.
:class:`RedisCoordinator` gives a cross-replica single-flight lock for blob downloads whose
value names the owner's ``--advertise-url``, so another replica can stream the download from it
instead of fetching upstream again, and take it over when the owner dies
(``proxy.fetch.fleet``); the fleet's shared secret for peer requests lives here too.

Redis can fail over: ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``
names Redis Sentinels instead of a server (:func:`connect`); the client asks them for the primary
of ``SERVICE`` and asks again when it goes away or turns into a replica. Redis Cluster is not
supported: a purge deletes a repository's keys in one ``DEL`` (keys in many hash slots), and
the metadata is small enough for one primary; Sentinel is how this Redis survives losing a node.

Redis is a help, never a dependency of a pull: every call that fails (refused, timeout, any
``redis.RedisError``) is logged (at most every 30 s) and the caller falls back to the filesystem
records and per-process single flight. Keys are built by :func:`key` only; the layout is drawn in
``storage/__init__.py``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Container
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

from storage.base import TagEntry
from storage.content import ContentStore, parse_tag

log = logging.getLogger(__name__)

PREFIX = "regproxy"
ACCESS_PAGE = 1000
#: A blob's download lock lives this long unless its owner renews it (every
#: ``BLOB_LOCK_RENEW`` seconds): a replica that dies without releasing it holds it at most this
#: long (see ``proxy.fetch.fleet``).
BLOB_LOCK_TTL_MS = 6_000
BLOB_LOCK_RENEW = 1.5
T = TypeVar("T")
_AWAY = object()
#: ZREM of each member (ARGV[2:]) whose score is below ARGV[1]: a replica that used the digest
#: meanwhile keeps its entry.
_FORGET = """
local removed = 0
for i = 2, #ARGV do
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) < tonumber(ARGV[1]) then
        removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    end
end
return removed
"""


def key(*parts: str) -> str:
    """The one place Redis keys are made: ``regproxy:<part>:<part>...``."""
    return ":".join((PREFIX, *parts))


class _Guard:
    """Runs Redis calls, turning failures into a fallback value and a rate-limited warning."""

    def __init__(self) -> None:
        self._warned_at = 0.0
        self.failures = 0

    async def __call__(self, call: Callable[[], Awaitable[T]], fallback: T) -> T:
        try:
            return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._warned_at > 30:
                self._warned_at = now
                log.warning("redis unavailable, continuing per replica error=%s", exc)
            else:
                log.debug("redis unavailable error=%s", exc)
            return fallback


def _glob(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
_TIMEOUTS: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: ``?sentinel_password=``: the sentinels' own password, when they have one.
    sentinel_password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]``.

    Raises ValueError saying what is wrong (never echoing the password).
    """
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"must start with {SENTINEL_SCHEME}")
    rest, _, query = url[len(SENTINEL_SCHEME) :].partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("["):
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host or (port and not port.isdigit()) or not 0 < int(port or SENTINEL_PORT) < 65536:
            raise ValueError(f"sentinel {item!r} is not HOST:PORT")
        sentinels.append((host, int(port or SENTINEL_PORT)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("needs the service name after the sentinels: /SERVICE or /SERVICE/DB")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"database {parts[1]!r} is not a number")
    params = parse_qs(query)
    unknown = set(params) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]!r} (known: sentinel_password)")
    return SentinelTarget(
        tuple(sentinels),
        unquote(parts[0]),
        int(parts[1]) if len(parts) == 2 else 0,
        username,
        password,
        params["sentinel_password"][0] if "sentinel_password" in params else None,
    )


def parse_redis_url(value: object) -> str:
    """A Redis URL regproxy can connect to (the ``redis.url`` setting); ValueError if not."""
    url = str(value).strip()
    if not url.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME)):
        raise ValueError(f"must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}")
    if url.startswith(SENTINEL_SCHEME):
        parse_sentinel_url(url)
    return url


def connect(url: str) -> aioredis.Redis:
    """A client of ``redis://``, ``rediss://``, ``unix://`` or the primary that Sentinels name
    (``redis+sentinel://``); see the module docstring."""
    if url.startswith(SENTINEL_SCHEME):
        target = parse_sentinel_url(url)
        sentinel_kwargs = dict(_TIMEOUTS)
        if target.sentinel_password is not None:
            sentinel_kwargs["password"] = target.sentinel_password
        manager = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs, **_TIMEOUTS)
        primary: aioredis.Redis = manager.master_for(
            target.service,
            db=target.db,
            username=target.username,
            password=target.password,
            health_check_interval=10,
        )
        return primary
    return aioredis.from_url(url, health_check_interval=10, **_TIMEOUTS)


async def close(client: aioredis.Redis) -> None:
    """Close ``client`` and, for a Sentinel-managed one, its connections to the sentinels."""
    await client.aclose()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


class RedisMetadata:
    """MetadataStore in Redis, written through to ``disk`` and falling back to it."""

    def __init__(self, client: aioredis.Redis, disk: ContentStore) -> None:
        self.client = client
        self.disk = disk
        self.guard = _Guard()

    async def get_tag(
        self, upstream: str, repository: str, tag: str, *, fresh: bool = False
    ) -> TagEntry | None:
        name = key("tag", upstream, repository, tag)
        raw = await self.guard(lambda: self.client.get(name), _AWAY)
        if raw is _AWAY:
            return await self.disk.get_tag(upstream, repository, tag, fresh=fresh)
        if raw is not None:
            try:
                return TagEntry(**json.loads(raw))  # type: ignore[arg-type]
            except (ValueError, TypeError):
                pass
        # Not in Redis: the store's record, not this process's memory of it (a purge by
        # another process removes both the Redis key and the record) ...
        record = await self.disk.get_record(upstream, repository, "tags", tag)
        entry = parse_tag(record) if record is not None else None
        if entry is not None:
            # ... and back into Redis (a Redis restarted empty), unless a replica set it since
            await self.guard(lambda: self.client.set(name, record, nx=True), None)  # type: ignore[arg-type]
        return entry

    async def set_tag(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        value = json.dumps(
            {
                "digest": entry.digest,
                "media_type": entry.media_type,
                "size": entry.size,
                "checked_at": entry.checked_at,
            }
        )
        await self.guard(
            lambda: self.client.set(key("tag", upstream, repository, tag), value), None
        )
        await self.disk.set_tag(upstream, repository, tag, entry)

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        await self.guard(lambda: self.client.delete(key("tag", upstream, repository, tag)), None)
        await self.disk.delete_tag(upstream, repository, tag)

    async def get_record(
        self, upstream: str, repository: str, kind: str, name: str
    ) -> bytes | None:
        raw = await self.guard(
            lambda: self.client.get(key("rec", upstream, repository, kind, name)), None
        )
        if raw is not None:
            return raw if isinstance(raw, bytes) else str(raw).encode()
        return await self.disk.get_record(upstream, repository, kind, name)

    async def set_record(
        self, upstream: str, repository: str, kind: str, name: str, value: bytes
    ) -> None:
        await self.guard(
            lambda: self.client.set(key("rec", upstream, repository, kind, name), value), None
        )
        await self.disk.set_record(upstream, repository, kind, name, value)

    async def purge(
        self, upstream: str, repository: str, tag: str | None, digests: Collection[str]
    ) -> int:
        """Forget what ``regproxy cache purge`` removed from the store: the tag (every tag when
        ``tag`` is None) and the repository's records of it, and the access times of
        ``digests``. Raises ``RedisError``: a purge that cannot reach Redis must say so.
        Returns how many keys went."""
        records = key("rec", upstream, repository)
        names = {tag, *digests, *(d.replace(":", "-") for d in digests)}
        doomed: list[Any] = []
        if tag is None:
            pattern = _glob(key("tag", upstream, repository)) + ":*"
            doomed += [k async for k in self.client.scan_iter(match=pattern, count=1000)]
        else:
            doomed.append(key("tag", upstream, repository, tag))
        async for found in self.client.scan_iter(match=_glob(records) + ":*", count=1000):
            name = found.decode() if isinstance(found, bytes) else str(found)
            kind, _, record = name[len(records) + 1 :].partition(":")
            if tag is None or kind == "tagslist" or record in names:
                doomed.append(found)
        gone = 0
        for i in range(0, len(doomed), 1000):
            gone += int(await self.client.delete(*doomed[i : i + 1000]))
        items = list(digests)
        for i in range(0, len(items), 1000):
            await self.client.zrem(key("access"), *items[i : i + 1000])
        return gone


@dataclass(frozen=True)
class BlobLock:
    """Who holds a blob's download lock: its value in Redis, parsed."""

    #: The value as stored: what :meth:`RedisCoordinator.release_dead` compares.
    raw: bytes
    owner: str
    url: str
    upstream: str
    repository: str


#: A compare-and-delete: delete KEYS[1] only while it holds ARGV[1].
_DELETE_IF = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
#: A compare-and-expire: renew KEYS[1]'s time to live (ARGV[2] ms) only while it holds ARGV[1].
_RENEW_IF = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


class RedisCoordinator:
    """Cross-replica single flight for blob downloads, and shared access times.

    A blob's lock (``regproxy:lock:blob:<digest>``) says who downloads it and where it can be
    streamed from (its value is a :class:`BlobLock`); it lives ``BLOB_LOCK_TTL_MS`` unless its
    owner renews it, and only its owner renews or deletes it, except that a replica which finds
    the owner gone (:meth:`release_dead`) deletes that very value, never a newer owner's.
    """

    def __init__(self, client: aioredis.Redis, instance: str) -> None:
        self.client = client
        self.instance = instance
        self.guard = _Guard()
        #: Members of the access set read (or removed) per command.
        self.page = ACCESS_PAGE
        self._forget = client.register_script(_FORGET)
        #: The lock values this replica set, by digest.
        self._held: dict[str, bytes] = {}

    async def acquire(
        self, digest: str, url: str = "", upstream: str = "", repository: str = ""
    ) -> bool | None:
        """True: we own the download (reachable at ``url``). False: another replica does.
        None: Redis is away."""
        value = json.dumps(
            {"owner": self.instance, "url": url, "upstream": upstream, "repository": repository}
        ).encode()

        async def call() -> object:
            return await self.client.set(
                key("lock", "blob", digest), value, nx=True, px=BLOB_LOCK_TTL_MS
            )

        ok = await self.guard(call, _AWAY)
        if ok is _AWAY:
            return None
        if ok:
            self._held[digest] = value
        return bool(ok)

    async def refresh(self, digest: str) -> bool:
        """Renew our lock; False once it is no longer ours (it expired, or was found dead)."""
        value = self._held.get(digest)
        if value is None:
            return False

        async def call() -> object:
            return await self.client.eval(
                _RENEW_IF, 1, key("lock", "blob", digest), value, BLOB_LOCK_TTL_MS
            )

        renewed = await self.guard(call, _AWAY)
        return renewed is _AWAY or bool(renewed)  # Redis away: ours until it says otherwise

    async def release(self, digest: str) -> None:
        value = self._held.pop(digest, None)
        if value is not None:
            await self.guard(
                lambda: self.client.eval(_DELETE_IF, 1, key("lock", "blob", digest), value), None
            )

    async def release_dead(self, digest: str, lock: BlobLock) -> bool:
        """Delete ``lock`` (read earlier) if it still holds the blob: its owner was found gone."""
        deleted = await self.guard(
            lambda: self.client.eval(_DELETE_IF, 1, key("lock", "blob", digest), lock.raw), 0
        )
        return bool(deleted)

    async def inflight(self, digest: str) -> BlobLock | None:
        """Who holds the blob's lock (None: nobody, or Redis is away)."""
        raw = await self.guard(lambda: self.client.get(key("lock", "blob", digest)), None)
        if raw is None:
            return None
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
        try:
            info = json.loads(raw)
            return BlobLock(
                raw,
                str(info["owner"]),
                str(info.get("url") or ""),
                str(info.get("upstream") or ""),
                str(info.get("repository") or ""),
            )
        except (ValueError, TypeError, KeyError):
            # A lock set by an older replica (its instance id only): held, not followable.
            return BlobLock(raw, raw.decode(errors="replace"), "", "", "")

    async def lock_ttl(self, digest: str) -> int | None:
        """Milliseconds the blob's lock has left (it jumps up when its owner renews it)."""
        ms = await self.guard(lambda: self.client.pttl(key("lock", "blob", digest)), -2)
        return int(ms) if int(ms) >= 0 else None

    async def locked(self, digest: str) -> bool:
        return bool(await self.guard(lambda: self.client.exists(key("lock", "blob", digest)), 0))

    async def peer_token(self) -> str | None:
        """The fleet's shared secret for peer streaming (made by the first replica to ask)."""

        async def call() -> object:
            await self.client.set(key("peer-token"), secrets.token_hex(16), nx=True)
            return await self.client.get(key("peer-token"))

        raw = await self.guard(call, None)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def accessed(self, digests: dict[str, float]) -> None:
        if digests:
            await self.guard(lambda: self.client.zadd(key("access"), digests), None)

    async def access_times(
        self, listed: Container[str], *, stale_before: float
    ) -> dict[str, float]:
        """Last use, by any replica, of each digest in ``listed`` (the store's content).

        The set is read ``page`` members at a time, newest first, so a pass never holds more
        of it than that. A member that is not in ``listed`` and was last used before
        ``stale_before`` (its content was evicted, purged or collected) is removed as it is met.
        """
        times: dict[str, float] = {}
        start = 0
        while True:
            read = partial(
                self.client.zrange,
                key("access"),
                start,
                start + self.page - 1,
                desc=True,
                withscores=True,
            )
            pairs: list[Any] = await self.guard(read, [])
            gone = []
            for raw, score in pairs:
                digest = raw.decode() if isinstance(raw, bytes) else str(raw)
                if digest in listed:
                    times[digest] = float(score)
                elif score < stale_before:
                    gone.append(digest)
            removed = await self.forget(gone, before=stale_before)
            if len(pairs) < self.page:
                return times
            start += self.page - removed  # removed members were on this page: the rest moved up

    async def forget(self, digests: Collection[str], *, before: float = math.inf) -> int:
        """Remove ``digests`` from the access set unless a replica used them since ``before``
        (evicted or purged content); returns how many went."""
        removed = 0
        items = list(digests)
        for i in range(0, len(items), self.page):
            page = items[i : i + self.page]
            if math.isinf(before):
                removed += int(await self.guard(partial(self.client.zrem, key("access"), *page), 0))
            else:
                args = [repr(before), *page]
                call = partial(self._forget, keys=[key("access")], args=args)
                removed += int(await self.guard(call, 0))
        return removed


#: A flight's lock (``regproxy:lock:flight:<key>``) is not renewed: a manifest or a tag answer
#: takes well under this; a replica that dies holding one delays the others this long at most.
FLIGHT_TTL_MS = 10_000


class RedisFlight:
    """:class:`storage.base.Flight` for the fleet: ``SET NX PX`` on ``regproxy:lock:flight:<key>``
    with a value of this process's own, deleted by compare-and-delete. Redis away: everyone
    leads (per-process single flight, as without Redis)."""

    def __init__(self, client: aioredis.Redis, instance: str) -> None:
        self.client = client
        self.guard = _Guard()
        self._value = f"{instance}:{secrets.token_hex(4)}".encode()

    async def lead(self, name: str) -> bool | None:
        name = key("lock", "flight", name)
        ok = await self.guard(
            lambda: self.client.set(name, self._value, nx=True, px=FLIGHT_TTL_MS), _AWAY
        )
        return None if ok is _AWAY else bool(ok)

    async def land(self, name: str) -> None:
        await self.guard(
            lambda: self.client.eval(_DELETE_IF, 1, key("lock", "flight", name), self._value), None
        )

    async def landed(self, name: str) -> bool:
        found = await self.guard(lambda: self.client.exists(key("lock", "flight", name)), 0)
        return not found
