"""Scheduled sync: keep chosen tags in the cache before any client asks (config ``sync:``).

One task per entry checks it every ``interval`` (±10% jitter, the first check soon after
start-up)::

    lease held by another replica (Redis)? ............................ skipped
    upstream backing off after a 429? ................................. ratelimited
    tags:   the literal tags as written, or tags/list (paginated) matched against the globs
    per tag:
      resolve   HEAD (ManifestService.by_tag(force=True)); a platform rule's sources too
      floor     ratelimit-remaining below sync_ratelimit_floor? ....... ratelimited (no GET)
      index     by digest, or synthesized by PlatformService when a rule matches the tag
      children  the chosen platforms' manifests (PlatformService.child_manifest)
      blobs     their config and layers: BlobService.download, each waited for, 4 at a time
      links     what a client pull would record, so that pull asks upstream nothing
      recency   CacheManager.touch: synced content counts as used now

It goes through the same services as a client pull, so what it leaves behind is exactly what a
pull would have: the tag answer (fresh for ``tag_ttl``), the manifests, the verified blobs, the
links and the platform sources. A pull within the tag TTL then makes no upstream request.
Resolution never GETs a manifest (Docker Hub counts manifest GETs against the pull limit, not
HEADs); a GET happens only for a digest that is not cached yet.

With Redis, each entry has a lease (``SET NX PX``, refreshed while a check runs) under::

    regproxy:sync:lease:<upstream>:<repository>:<entry id>    the replica checking it
    regproxy:sync:status:<upstream>:<repository>:<entry id>   its last result (JSON), so
                                                              every replica reports it

so one replica checks each entry per interval. What it does not promise: a replica that loses
Redis checks its entries itself (the blob downloads stay single-flight per replica), and a check
that outlives its lease because the replica stalled may overlap with another replica's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError
from yarl import URL

from proxy.access.auth import Authenticator
from proxy.cache.blobs import BlobService
from proxy.cache.links import Links
from proxy.cache.manifests import Manifest, ManifestService
from proxy.core.errors import RegistryError, StorageError, UpstreamError
from proxy.core.media import INDEX_TYPES
from proxy.core.metrics import Metrics
from proxy.core.reference import is_digest, parse_image
from proxy.fetch.upstream import Upstream, Upstreams
from proxy.ops.settings import SyncConfig, SyncEntry
from proxy.platforms.rules import Entry, Platform, Rule, index_entries, render
from proxy.platforms.service import PlatformService
from storage.eviction import CacheManager
from storage.redis import key as redis_key

log = logging.getLogger(__name__)

#: Checks happen every interval times a random factor in [1 - JITTER, 1 + JITTER].
JITTER = 0.1
#: Blob downloads sync runs at once, over all entries.
CONCURRENCY = 4
#: Tags one entry keeps warm at most (a glob such as ``*`` on a busy repository).
MAX_TAGS = 256
TAGS_PAGE = 1000
MAX_TAG_PAGES = 100


class _Paused(Exception):
    """The upstream is rate limiting (429 back-off) or below the floor: fetch nothing now."""


@dataclass
class TagStatus:
    tag: str
    digest: str | None = None
    #: Unix time the tag's content was last confirmed complete in the cache.
    synced_at: float | None = None
    error: str | None = None


@dataclass
class EntryState:
    entry: SyncEntry
    id: str
    tags: dict[str, TagStatus] = field(default_factory=dict)
    last_run: float | None = None
    last_result: str | None = None
    last_success: float | None = None
    next_run: float = 0.0
    error: str | None = None
    #: The replica whose check this is (another one's, read from Redis).
    checked_by: str | None = None

    def describe(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "repository": entry.name,
            "upstream": entry.upstream,
            "upstream_repository": entry.repository,
            "tag_globs": list(entry.tags),
            "platforms": list(entry.platforms) if entry.platforms is not None else "all",
            "interval": entry.interval,
            "last_run": self.last_run,
            "last_result": self.last_result,
            "last_success": self.last_success,
            "next_run": self.next_run,
            "error": self.error,
            "checked_by": self.checked_by,
            "tags": [asdict(t) for t in sorted(self.tags.values(), key=lambda t: t.tag)],
            "digests": {t.tag: t.digest for t in self.tags.values() if t.digest},
        }


def entry_id(entry: SyncEntry) -> str:
    """Stable across replicas with the same configuration."""
    text = json.dumps([entry.tags, entry.platforms, entry.interval])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def matching(tags: Iterable[str], globs: Iterable[str]) -> list[str]:
    patterns = list(globs)
    return [t for t in tags if any(fnmatch.fnmatchcase(t, g) for g in patterns)]


class SyncService:
    """Runs the ``sync:`` entries in the background; see the module docstring."""

    def __init__(
        self,
        config: SyncConfig,
        *,
        upstreams: Upstreams,
        manifests: ManifestService,
        platforms: PlatformService,
        blobs: BlobService,
        links: Links,
        cache: CacheManager | None = None,
        metrics: Metrics | None = None,
        redis: aioredis.Redis | None = None,
        instance: str = "",
        concurrency: int = CONCURRENCY,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.upstreams = upstreams
        self.manifests = manifests
        self.platforms = platforms
        self.blobs = blobs
        self.links = links
        self.cache = cache
        self.metrics = metrics
        self.redis = redis
        self.instance = instance
        #: With an htpasswd file, the status (repository names, digests) needs a login.
        self.auth = auth
        self.states = [EntryState(e, entry_id(e)) for e in config.entries]
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self._redis_warned_at = 0.0

    # -- lifetime --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.manifests.offline:
            if self.states:
                log.warning("sync disabled: offline mode never contacts upstream")
            return
        for state in self.states:
            self._tasks.append(asyncio.create_task(self._loop(state)))
        if self.states:
            log.info("sync started entries=%d", len(self.states))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _loop(self, state: EntryState) -> None:
        # The first check comes soon after start-up, spread so replicas do not all ask at once.
        state.next_run = time.time() + random.uniform(0, min(state.entry.interval, 10.0) * 0.2)
        while True:
            await asyncio.sleep(max(0.0, state.next_run - time.time()))
            try:
                await self.run(state)  # sets the next run's time
            except Exception:  # a bug must not end the schedule
                log.exception("sync check crashed repository=%s", state.entry.name)
                state.next_run = time.time() + state.entry.interval

    @staticmethod
    def _schedule(state: EntryState) -> None:
        state.next_run = time.time() + state.entry.interval * random.uniform(1 - JITTER, 1 + JITTER)

    # -- one check -------------------------------------------------------------------------------

    async def run(self, state: EntryState) -> str:
        """Check one entry now; return the result (``success``, ``error``, ``ratelimited``,
        ``skipped``)."""
        entry = state.entry
        upstream = self.upstreams[entry.upstream]
        lease = await self._acquire(state)
        if lease is False:
            self._count("skipped")
            state.last_result = "skipped"
            self._schedule(state)
            return "skipped"
        refresher = asyncio.create_task(self._keep_lease(state)) if lease is True else None
        started = time.time()
        try:
            result, error = await self._check(state, upstream)
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
        state.last_run, state.last_result, state.error = started, result, error
        state.checked_by = self.instance
        if result == "success":
            state.last_success = time.time()
            if self.metrics is not None:
                self.metrics.sync_last_success.labels(f"{entry.upstream}/{entry.repository}").set(
                    state.last_success
                )
        self._count(result)
        self._schedule(state)
        await self._publish(state)
        return result

    async def _check(self, state: EntryState, upstream: Upstream) -> tuple[str, str | None]:
        entry = state.entry
        try:
            self._check_backoff(upstream)
            tags = await self._tags(entry, upstream)
        except _Paused as exc:
            return "ratelimited", str(exc)
        except (RegistryError, UpstreamError, StorageError) as exc:
            if self._backing_off(upstream):
                return "ratelimited", "upstream answered 429"
            log.warning("sync cannot list tags repository=%s error=%s", entry.name, exc)
            return "error", f"listing tags: {_describe(exc)}"
        for gone in set(state.tags) - set(tags):
            del state.tags[gone]
        result, error = "success", None
        for tag in tags:
            status = state.tags.setdefault(tag, TagStatus(tag))
            try:
                await self._sync_tag(entry, upstream, status)
                status.error = None
            except _Paused as exc:
                status.error = str(exc)
                return "ratelimited", str(exc)
            except (RegistryError, UpstreamError, StorageError) as exc:
                status.error = _describe(exc)
                if self._backing_off(upstream):
                    return "ratelimited", "upstream answered 429"
                log.warning(
                    "sync of a tag failed repository=%s tag=%s error=%s",
                    entry.name,
                    tag,
                    status.error,
                )
                result, error = "error", f"{tag}: {status.error}"
        if not tags:
            log.warning("sync entry matches no upstream tag repository=%s", entry.name)
            return "error", "no upstream tag matches " + ", ".join(entry.tags)
        return result, error

    async def _tags(self, entry: SyncEntry, upstream: Upstream) -> list[str]:
        if entry.literal_tags:
            return list(entry.tags)
        found: list[str] = []
        last: str | None = None
        for _ in range(MAX_TAG_PAGES):
            query = {"n": str(TAGS_PAGE)}
            if last is not None:
                query["last"] = last
            body, headers, _ = await self.manifests.tags_list(upstream, entry.repository, query)
            try:
                page = [str(t) for t in json.loads(body).get("tags") or []]
            except (ValueError, AttributeError):
                page = []
            found += page
            last = _next_last(headers.get("Link"))
            if not page or last is None:
                break
        tags = matching(dict.fromkeys(found), entry.tags)
        if len(tags) > MAX_TAGS:
            log.warning(
                "sync entry matches too many tags; keeping the first repository=%s matched=%d "
                "kept=%d",
                entry.name,
                len(tags),
                MAX_TAGS,
            )
            tags = tags[:MAX_TAGS]
        return tags

    async def _sync_tag(self, entry: SyncEntry, upstream: Upstream, status: TagStatus) -> None:
        repository = entry.repository
        rule = self.platforms.rule_for(upstream.name, repository, status.tag)
        entries: list[Entry] | None
        if rule is None:
            head = await self.manifests.by_tag(
                upstream, repository, status.tag, head=True, force=True
            )
            self._check_fresh(head, upstream)
            self._check_floor(upstream)
            top = await self.manifests.by_digest(upstream, repository, head.digest, head=False)
            entries = index_entries(top) if top.media_type in INDEX_TYPES else None
        else:
            await self._resolve_rule(upstream, repository, status.tag, rule)
            self._check_floor(upstream)
            top, found = await self.platforms.synthesize(
                upstream, repository, status.tag, rule, force=True
            )
            entries = found if top.media_type in INDEX_TYPES else None
        fetched = top.size if top.cache == "MISS" else 0
        await self.links.link_manifest(upstream.name, repository, top)
        children = [top]
        if entries is not None:
            wanted = [e for e in entries if self._wanted(entry, e.platform)]
            if not wanted:
                raise _NoPlatform(entry, entries)
            children = []
            for child in wanted:
                self._check_floor(upstream)
                manifest = await self.platforms.child_manifest(
                    upstream, repository, child.descriptor["digest"], head=False
                )
                fetched += manifest.size if manifest.cache == "MISS" else 0
                await self.links.link_manifest(upstream.name, repository, manifest)
                children.append(manifest)
        blobs: dict[str, None] = {}
        for manifest in children:
            blobs.update(dict.fromkeys(_blobs_of(manifest)))
        results = await asyncio.gather(
            *(self._blob(upstream, repository, d) for d in blobs), return_exceptions=True
        )
        for outcome in results:  # every download ran to its end; now report the first failure
            if isinstance(outcome, BaseException):
                raise outcome
        fetched += sum(r for r in results if isinstance(r, int))
        if self.metrics is not None and fetched:
            self.metrics.sync_bytes.inc(fetched)
        # New to this process and fetched now, or moved since the last check (a restart finds
        # its content cached: not news).
        if top.digest != status.digest and (fetched or status.digest is not None):
            log.info(
                "sync fetched a new digest upstream=%s repository=%s tag=%s digest=%s "
                "previous=%s manifests=%d blobs=%d bytes=%d",
                upstream.name,
                repository,
                status.tag,
                top.digest,
                status.digest or "-",
                len(children) + (entries is not None),
                len(blobs),
                fetched,
            )
        status.digest, status.synced_at = top.digest, time.time()

    async def _resolve_rule(
        self, upstream: Upstream, repository: str, tag: str, rule: Rule
    ) -> None:
        """HEAD the tag and every rule source, so the synthesized index is rebuilt from
        current answers; a 404 is an answer (the source lacks the tag), not a failure."""
        refs: list[tuple[Upstream, str, str]] = [(upstream, repository, tag)]
        for _, template in rule.sources:
            ref = parse_image(render(template, repository, tag))
            if is_digest(ref.reference):
                continue
            src_name, src_repo = self.platforms.router.route(ref.repository, None)
            refs.append((self.upstreams[src_name], src_repo, ref.reference))
        for source, src_repo, reference in refs:
            try:
                head = await self.manifests.by_tag(
                    source, src_repo, reference, head=True, force=True
                )
            except RegistryError as exc:
                if exc.status == 404:
                    continue
                raise
            self._check_fresh(head, source)

    async def _blob(self, upstream: Upstream, repository: str, digest: str) -> int:
        """Make sure ``digest`` is cached; return the bytes fetched for it."""
        fetched = 0
        if await self.blobs.store.stat_blob(digest) is None:
            self._check_floor(upstream)
            source, src_repo = await self.platforms.source_of(upstream, repository, digest)
            async with self._slots:
                dl = self.blobs.download(source, src_repo, digest)
                await dl.started
                while not dl.done:
                    await dl.wait_change()
            if dl.error is not None:
                raise dl.error
            fetched = dl.written
        if self.cache is not None:
            self.cache.touch("blobs", digest)
        return fetched

    # -- rate limits -----------------------------------------------------------------------------

    @staticmethod
    def _backing_off(upstream: Upstream) -> bool:
        return upstream.backoff_until > time.monotonic()

    def _check_backoff(self, upstream: Upstream) -> None:
        if self._backing_off(upstream):
            wait = upstream.backoff_until - time.monotonic()
            raise _Paused(f"upstream answered 429; backing off {wait:.0f}s more")

    def _check_floor(self, upstream: Upstream) -> None:
        self._check_backoff(upstream)
        remaining = upstream.ratelimit_remaining
        floor = self.config.floor(upstream.ratelimit_limit)
        if remaining is not None and floor is not None and remaining < floor:
            raise _Paused(
                f"ratelimit-remaining {remaining} is below the sync floor {floor:g}; "
                "leaving it to clients"
            )

    def _check_fresh(self, answer: Manifest, upstream: Upstream) -> None:
        """A STALE answer means upstream failed and the cache answered instead."""
        if answer.cache == "STALE":
            self._check_backoff(upstream)
            raise _Stale(upstream.name)

    # -- which platforms -------------------------------------------------------------------------

    @staticmethod
    def _wanted(entry: SyncEntry, platform: Platform | None) -> bool:
        if platform is None or platform.unknown:
            return False  # attestations and descriptors without a platform: no client pulls them
        return entry.platforms is None or str(platform) in entry.platforms

    # -- replicas --------------------------------------------------------------------------------

    def _lease_key(self, state: EntryState, kind: str = "lease") -> str:
        return redis_key("sync", kind, state.entry.upstream, state.entry.repository, state.id)

    def _lease_ms(self, state: EntryState) -> int:
        # Shorter than the shortest jittered interval, so the holder takes it again next time.
        return max(100, int(state.entry.interval * (1 - 2 * JITTER) * 1000))

    async def _acquire(self, state: EntryState) -> bool | None:
        """True: ours for this interval. False: another replica's. None: no Redis (or away)."""
        if self.redis is None:
            return None
        try:
            ok = await self.redis.set(
                self._lease_key(state), self.instance, nx=True, px=self._lease_ms(state)
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_away(exc)
            return None
        return bool(ok)

    async def _keep_lease(self, state: EntryState) -> None:
        assert self.redis is not None
        every = self._lease_ms(state) / 2000
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self.redis.pexpire(self._lease_key(state), self._lease_ms(state))

    async def _publish(self, state: EntryState) -> None:
        if self.redis is None:
            return
        doc = json.dumps(state.describe())
        ttl = max(60, int(state.entry.interval * 10))
        try:
            await self.redis.set(self._lease_key(state, "status"), doc, ex=ttl)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_away(exc)

    def _redis_away(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._redis_warned_at > 30:
            self._redis_warned_at = now
            log.warning("redis unavailable, sync continues per replica error=%s", exc)

    # -- status ----------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        entries = []
        for state in self.states:
            doc = state.describe()
            shared = await self._shared_status(state)
            if shared is not None and (shared.get("last_run") or 0) > (doc["last_run"] or 0):
                # Another replica checked it last: report that check, with our next one.
                shared["next_run"] = doc["next_run"]
                doc = shared
            entries.append(doc)
        floor = self.config
        return {
            "instance": self.instance,
            "ratelimit_floor": (
                floor.ratelimit_floor_count
                if floor.ratelimit_floor_count is not None
                else f"{(floor.ratelimit_floor_fraction or 0) * 100:g}%"
            ),
            "entries": entries,
        }

    async def _shared_status(self, state: EntryState) -> dict[str, Any] | None:
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(self._lease_key(state, "status"))
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_away(exc)
            return None
        if raw is None:
            return None
        try:
            doc: dict[str, Any] = json.loads(raw)
        except ValueError:
            return None
        return doc

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.sync_runs.labels(result).inc()


class _Stale(UpstreamError):
    def __init__(self, upstream: str) -> None:
        super().__init__("upstream failed; the cache answered stale", upstream=upstream)


class _NoPlatform(RegistryError):
    code, status, message = "MANIFEST_UNKNOWN", 404, "no manifest for the chosen platforms"

    def __init__(self, entry: SyncEntry, entries: list[Entry]) -> None:
        available = sorted({str(p) for e in entries if (p := e.platform) and not p.unknown})
        super().__init__(
            {"wanted": list(entry.platforms or ()), "available": available},
            message=f"no manifest for {', '.join(entry.platforms or ())}; "
            f"upstream has {', '.join(available) or 'none'}",
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RegistryError):
        return f"{exc.code}: {exc.message}"
    return str(exc) or type(exc).__name__


def _blobs_of(manifest: Manifest) -> list[str]:
    if manifest.data is None:
        return []
    try:
        doc = json.loads(manifest.data)
    except ValueError:
        return []
    found = []
    for blob in [doc.get("config") or {}, *(doc.get("layers") or [])]:
        if isinstance(blob, dict) and isinstance(blob.get("digest"), str):
            found.append(blob["digest"])
    return found


def _next_last(link: str | None) -> str | None:
    """The ``last`` parameter of a tags/list ``Link: <...>; rel="next"`` header."""
    if not link or "<" not in link:
        return None
    target = link[link.index("<") + 1 : link.index(">")] if ">" in link else ""
    return URL(target).query.get("last")


# -- HTTP --------------------------------------------------------------------------------------

SYNC = web.AppKey("sync", SyncService)


async def handle_sync_status(request: web.Request) -> web.Response:
    """``GET /_regproxy/sync``: each entry's tags, digests, last and next check."""
    request["route"] = "sync"
    service = request.app[SYNC]
    if service.auth is not None:
        await service.auth.check_login(request.headers.get("Authorization"), request.remote)
    return web.json_response(await service.status())
