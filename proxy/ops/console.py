"""The operator's console: a read-only page at ``GET /_regproxy/`` and the JSON behind it.

Routes (all ``GET``; with ``auth:`` on, only users listed in ``auth.admins``)::

    /_regproxy/                      the page (ops/console_static/index.html), no build, no CDN
    /_regproxy/static/<file>         its script and style sheet
    /_regproxy/api/summary           storage vs limit, hit ratio, bytes by source, upstreams,
                                     downloads in flight, top repositories, evictions, pins
    /_regproxy/api/history           samples of used bytes and hit ratio (in-memory ring)
    /_regproxy/api/inspect?image=    platforms of a tag with sources, sizes, cached or not

Where the figures come from::

    Metrics (prometheus registry) ──> hit ratio, bytes served from cache / upstream, requests
    │                                  saved, per-upstream request counts -> health, last error
    CacheManager.used / .limit ─────> storage gauge and its watermarks (config.cache)
    BlobService.downloads ──────────> downloads in flight; rate from successive looks
    UsageStats.pulls ───────────────> pulls per repository (persisted by ``cache stats``)
    Console.observe (access log) ───> bytes served per repository, since start
    CacheManager.on_evict ──────────> recently evicted (see ``_watch_evictions``)
    <storage>/stats/*.json ─────────> fleet-wide hits, misses, pulls of every replica

What it does not promise: the history, the bytes per repository and the eviction list live in
this process's memory (lost on restart, one replica's view); the fleet figures are only as fresh
as each replica's last stats save (15 s). An upstream's health is inferred from the outcome of
regproxy's own requests to it, so an upstream nobody pulled from lately shows as "idle".

Nothing here shows a credential or a token, and repositories (top lists, downloads) are listed
only when the user asking may pull them (``Authenticator.allowed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_response import StreamResponse

from proxy.core.errors import Denied, NameInvalid, RegistryError, StorageError, Unauthorized
from proxy.core.reference import parse_image
from proxy.fetch.download import CACHE_RESULT, Cache
from proxy.ops.settings import ConsoleConfig
from proxy.registry import keys
from proxy.registry.routes import route_for, split_path
from storage.settings import CacheSettings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("console_static")
STATIC_FILES = {
    "console.js": "text/javascript",
    "console.css": "text/css",
}
#: Statuses of upstream requests that count as a failure for an upstream's health.
FAILED = frozenset({"error", "429"})
TOP_N = 10
EVICTED_KEPT = 50


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall-clock seconds
    used: int
    limit: int | None
    hits: int
    misses: int
    #: Hits over hits+misses since the previous sample; None when nothing was served.
    hit_ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "used_bytes": self.used,
            "limit_bytes": self.limit,
            "hit_ratio": None if self.hit_ratio is None else round(self.hit_ratio, 4),
        }


@dataclass(slots=True)
class _UpstreamState:
    last_error: str | None = None
    last_error_at: float | None = None
    last_ok_at: float | None = None


class Console:
    """The console's own state: history ring, bytes per repository, evictions, rates."""

    def __init__(
        self,
        app: web.Application,
        settings: ConsoleConfig,
        cache_settings: CacheSettings,
        *,
        redis: bool,
    ) -> None:
        self.app = app
        self.sample_every = settings.sample_every
        self.cache_settings = cache_settings
        self.redis = redis
        self.history: deque[Sample] = deque(
            maxlen=max(2, int(settings.history / settings.sample_every) + 1)
        )
        self.repo_bytes: Counter[str] = Counter()
        #: Evicted files, newest last; appended from the eviction thread (deque is thread-safe).
        self.evicted: deque[dict[str, Any]] = deque(maxlen=EVICTED_KEPT)
        self.started_at = time.time()
        #: Whether evictions reach ``evicted_file`` (see ``_watch_evictions``).
        self.tracks_evictions = False
        self._upstreams: dict[str, _UpstreamState] = {}
        self._seen_counts: dict[tuple[str, str, str], float] = {}
        self._rates: dict[str, tuple[float, int, float]] = {}  # digest -> (t, written, rate)
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- what the rest of regproxy tells us ----------------------------------------------------

    def observe(self, request: web.Request, response: StreamResponse) -> None:
        """Called from the access logger once a response was sent: bytes per repository."""
        if request.method != "GET" or request.get("kind") is None:
            return
        if not 200 <= response.status < 300 or request.get(CACHE_RESULT) is Cache.ABORTED:
            return
        try:
            name, _, _ = split_path(request.match_info["path"])
            upstream, repository = self.app[keys.ROUTER].route(name, request.query.get("ns"))
        except (web.HTTPException, RegistryError, KeyError):
            return
        # Body bytes, counted as regproxy_cache_served_bytes_total counts them.
        self.repo_bytes[f"{upstream}/{repository}"] += response.content_length or 0
        if len(self.repo_bytes) > 10_000:  # bounded: keep the heavy half
            self.repo_bytes = Counter(dict(self.repo_bytes.most_common(5_000)))

    def evicted_file(self, kind: str, digest: str, size: int) -> None:
        """An eviction removed a file; may be called from the eviction thread."""
        self.evicted.append(
            {"at": round(time.time(), 3), "kind": kind, "digest": digest, "size": size}
        )

    # -- sampling --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.sample_every)
            try:
                self.sample()
            except Exception:
                log.exception("console sample failed")

    def sample(self) -> Sample:
        cache = self.app[keys.CACHE]
        hits, misses = self._hits_misses()
        ratio = None
        if self.history:
            prev = self.history[-1]
            served = (hits - prev.hits) + (misses - prev.misses)
            ratio = (hits - prev.hits) / served if served > 0 else None
        elif hits + misses:
            ratio = hits / (hits + misses)
        sample = Sample(time.time(), cache.used, cache.limit, hits, misses, ratio)
        self.history.append(sample)
        self._check_upstreams()
        return sample

    def _metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.app[keys.METRICS].view.get_sample_value(name, labels or {})
        return value or 0.0

    def _hits_misses(self) -> tuple[int, int]:
        hits = sum(self._metric("regproxy_cache_hits_total", {"kind": k}) for k in KINDS)
        misses = sum(self._metric("regproxy_cache_misses_total", {"kind": k}) for k in KINDS)
        return int(hits), int(misses)

    def _check_upstreams(self) -> None:
        """Fold new upstream request outcomes (from the metrics) into each upstream's state."""
        now = time.time()
        with self._lock:
            for metric in self.app[keys.METRICS].view.collect():
                if metric.name != "regproxy_upstream_requests":
                    continue
                for s in metric.samples:
                    if not s.name.endswith("_total"):
                        continue
                    key = (s.labels["upstream"], s.labels["method"], s.labels["status"])
                    new = s.value - self._seen_counts.get(key, 0.0)
                    self._seen_counts[key] = s.value
                    if new <= 0:
                        continue
                    state = self._upstreams.setdefault(key[0], _UpstreamState())
                    status = key[2]
                    if status in FAILED or status.startswith("5"):
                        what = "connection failed" if status == "error" else f"HTTP {status}"
                        state.last_error = f"{what} on {key[1]}"
                        state.last_error_at = now
                    else:
                        state.last_ok_at = now

    # -- the JSON --------------------------------------------------------------------------------

    async def summary(self, user: str | None) -> dict[str, Any]:
        app = self.app
        cache = app[keys.CACHE]
        hits, misses = self._hits_misses()
        from_cache = int(self._metric("regproxy_cache_served_bytes_total", {"source": "cache"}))
        from_upstream = int(
            self._metric("regproxy_cache_served_bytes_total", {"source": "upstream"})
        )
        self._check_upstreams()
        limit = cache.limit
        bounds = self.cache_settings
        return {
            "replica": self.replica(),
            "storage": {
                "used_bytes": cache.used,
                "limit_bytes": limit,
                "used_fraction": round(cache.used / limit, 4) if limit else None,
                "high_watermark": bounds.high_watermark,
                "low_watermark": bounds.low_watermark,
                "high_watermark_bytes": int(limit * bounds.high_watermark) if limit else None,
                "low_watermark_bytes": int(limit * bounds.low_watermark) if limit else None,
                "full": cache.full,
                "blob_ttl_seconds": bounds.blob_ttl,
            },
            "traffic": {
                "hits": hits,
                "misses": misses,
                "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
                "bytes_from_cache": from_cache,
                "bytes_from_upstream": from_upstream,
                "upstream_requests_saved": hits,
                "upstream_requests": int(self._upstream_requests_total()),
                "stale_served": int(self._metric("regproxy_stale_served_total")),
            },
            "upstreams": self.upstreams(),
            "downloads": self.downloads(user),
            "top_repositories": self.top_repositories(user),
            "evicted": {
                "total": {
                    k: int(self._metric("regproxy_evictions_total", {"kind": k})) for k in KINDS
                },
                "recent": list(reversed(self.evicted)),
                "tracked": self.tracks_evictions,
            },
            "pinned": list(self.cache_settings.pin),
            "fleet": await self.fleet(user),
        }

    def replica(self) -> dict[str, Any]:
        return {
            "hostname": socket.gethostname(),
            "instance": self.app[keys.STORAGE].instance,
            "started_at": round(self.started_at, 3),
            "redis": self.redis,
        }

    def _upstream_requests_total(self) -> float:
        total = 0.0
        for metric in self.app[keys.METRICS].view.collect():
            if metric.name == "regproxy_upstream_requests":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total

    def upstreams(self) -> list[dict[str, Any]]:
        out = []
        now = time.monotonic()
        for name, upstream in self.app[keys.UPSTREAMS].by_name.items():
            state = self._upstreams.get(name, _UpstreamState())
            reset_in = max(0.0, upstream.backoff_until - now)
            if reset_in > 0:
                health = "rate-limited"
            elif state.last_error_at is not None and (
                state.last_ok_at is None or state.last_error_at > state.last_ok_at
            ):
                health = "failing"
            elif state.last_ok_at is not None:
                health = "ok"
            else:
                health = "idle"
            last_error = getattr(upstream, "last_error", None) or state.last_error
            out.append(
                {
                    "name": name,
                    "url": upstream.config.url,  # parse_url refuses credentials in URLs
                    "health": health,
                    "last_error": None if last_error is None else str(last_error)[:300],
                    "last_error_at": state.last_error_at,
                    "last_ok_at": state.last_ok_at,
                    "ratelimit_remaining": upstream.ratelimit_remaining,
                    "ratelimit_reset_seconds": round(reset_in, 1) if reset_in > 0 else None,
                    "requests": int(self._upstream_requests_of(name)),
                }
            )
        return out

    def _upstream_requests_of(self, name: str) -> float:
        return sum(v for (u, _, _), v in self._seen_counts.items() if u == name)

    def downloads(self, user: str | None) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        live = set()
        for digest, dl in list(self.app[keys.BLOBS].downloads.items()):
            if dl.done:
                continue
            live.add(digest)
            t, written, rate = self._rates.get(digest, (now, dl.written, 0.0))
            if now - t >= 0.5:
                rate = (dl.written - written) / (now - t)
                t, written = now, dl.written
            self._rates[digest] = (t, written, rate)
            if not self._may_see(user, dl.upstream.name, dl.repository):
                continue
            out.append(
                {
                    "digest": digest,
                    "upstream": dl.upstream.name,
                    "repository": dl.repository,
                    "size": dl.size,
                    "written": dl.written,
                    "progress": round(dl.written / dl.size, 4) if dl.size else None,
                    "rate_bytes_per_second": round(max(rate, 0.0)),
                }
            )
        for gone in set(self._rates) - live:
            del self._rates[gone]
        return out

    def top_repositories(self, user: str | None) -> dict[str, list[dict[str, Any]]]:
        pulls = self.app[keys.USAGE].pulls
        return {
            "by_bytes": [
                {"repository": repo, "bytes": n, "pulls": pulls.get(repo, 0)}
                for repo, n in self._visible(user, self.repo_bytes)
            ],
            "by_pulls": [
                {"repository": repo, "pulls": n, "bytes": self.repo_bytes.get(repo, 0)}
                for repo, n in self._visible(user, pulls)
            ],
        }

    def _visible(self, user: str | None, counts: Counter[str]) -> list[tuple[str, int]]:
        out = []
        for repo, n in counts.most_common():
            upstream, _, repository = repo.partition("/")
            if self._may_see(user, upstream, repository):
                out.append((repo, n))
                if len(out) == TOP_N:
                    break
        return out

    def _may_see(self, user: str | None, upstream: str, repository: str) -> bool:
        auth = self.app[keys.AUTH]
        return not auth.enabled or auth.allowed(user, upstream, repository)

    async def fleet(self, user: str | None) -> dict[str, Any]:
        """Every replica's usage, summed: this one's live, the others' from their stats files
        (``stats/<host>.json`` in the store, as ``regproxy cache stats`` reads them)."""
        usage = self.app[keys.USAGE]
        store = self.app[keys.STORAGE]
        replicas, hits, misses = 1, usage.hits, usage.misses
        pulls: Counter[str] = Counter(usage.pulls)
        try:
            names = await store.list_files("stats/")
        except StorageError:
            names = []
        for name in sorted(names):
            if name == usage.name or not name.endswith(".json"):
                continue
            with contextlib.suppress(StorageError, ValueError, TypeError, AttributeError):
                doc = json.loads(await store.get_file(name) or b"")
                hits += int(doc.get("hits", 0))
                misses += int(doc.get("misses", 0))
                pulls.update({str(k): int(v) for k, v in (doc.get("pulls") or {}).items()})
                replicas += 1
        return {
            "replicas": replicas,
            "hits": hits,
            "misses": misses,
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "top_pulls": [{"repository": r, "pulls": n} for r, n in self._visible(user, pulls)],
        }

    async def inspect(self, request: web.Request, image: str) -> dict[str, Any]:
        """The ``/_regproxy/inspect`` data, plus whether each platform is cached here."""
        ref = parse_image(image)
        upstream, repository = await route_for(request, ref.repository)
        tag = ref.tag or "latest"
        manifest, entries = await self.app[keys.PLATFORMS].describe(upstream, repository, tag)
        platforms = []
        trust = self.app[keys.TRUST]
        verdicts = (
            await trust.describe_all(upstream, repository, tag, manifest) if trust.enabled else []
        )
        for position, entry in enumerate(entries):
            row = entry.describe()
            row.update(await self._cached(row["digest"]))
            if position < len(verdicts):
                row["trust"] = verdicts[position]
            platforms.append(row)
        return {
            "image": f"{upstream.name}/{repository}:{tag}",
            "digest": manifest.digest,
            "media_type": manifest.media_type,
            "platforms": platforms,
        }

    async def _cached(self, digest: str) -> dict[str, Any]:
        """``cached``: "yes" (manifest and every blob here), "partial" or "no"; and the bytes."""
        found = await self.app[keys.MANIFESTS].local(digest)
        if found is None or found.data is None:
            return {"cached": "no", "image_bytes": None, "cached_bytes": 0}
        try:
            doc = json.loads(found.data)
        except ValueError:
            return {"cached": "yes", "image_bytes": None, "cached_bytes": 0}
        blobs = [doc.get("config") or {}, *(doc.get("layers") or [])]
        storage = self.app[keys.STORAGE]
        total = cached = 0
        missing = False
        for blob in blobs:
            if not isinstance(blob, dict) or not blob.get("digest"):
                continue
            total += int(blob.get("size") or 0)
            size = await storage.stat_blob(str(blob["digest"]))
            if size is None:
                missing = True
            else:
                cached += size
        return {
            "cached": "partial" if missing else "yes",
            "image_bytes": total,
            "cached_bytes": cached,
        }


KINDS = ("blob", "manifest")
CONSOLE = web.AppKey("console", Console)


def _watch_evictions(cache: Any, console: Console) -> None:
    """Have the CacheManager report each evicted blob or manifest to the console too."""
    previous: Callable[[str, str, int], None] | None = cache.on_evict

    def evicted(kind: str, digest: str, size: int) -> None:
        if previous is not None:
            previous(kind, digest, size)
        console.evicted_file(kind, digest, size)

    cache.on_evict = evicted
    console.tracks_evictions = True


# -- HTTP ------------------------------------------------------------------------------------------


async def require_admin(request: web.Request) -> str | None:
    """The user, once allowed: anyone without ``auth:``; else only ``auth.admins``."""
    request["route"] = "console"
    auth = request.app[keys.AUTH]
    if not auth.enabled:
        return None
    user = await auth.user(request.headers.get("Authorization"), request.remote)
    if user is None:
        raise Unauthorized(headers=auth.challenge())
    if not auth.is_admin(user):
        raise Denied()
    return user


def _no_store(resp: web.StreamResponse) -> web.StreamResponse:
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


async def handle_page(request: web.Request) -> web.StreamResponse:
    await require_admin(request)
    resp = web.Response(
        body=(STATIC_DIR / "index.html").read_bytes(), content_type="text/html", charset="utf-8"
    )
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return _no_store(resp)


async def handle_static(request: web.Request) -> web.StreamResponse:
    await require_admin(request)
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    body = (STATIC_DIR / name).read_bytes()
    return _no_store(web.Response(body=body, content_type=STATIC_FILES[name], charset="utf-8"))


async def handle_summary(request: web.Request) -> web.StreamResponse:
    user = await require_admin(request)
    return _no_store(web.json_response(await request.app[CONSOLE].summary(user)))


async def handle_history(request: web.Request) -> web.StreamResponse:
    await require_admin(request)
    console = request.app[CONSOLE]
    return _no_store(
        web.json_response(
            {
                "replica": console.replica(),
                "sample_every_seconds": console.sample_every,
                "samples": [s.to_json() for s in console.history],
            }
        )
    )


async def handle_inspect(request: web.Request) -> web.StreamResponse:
    await require_admin(request)
    image = request.query.get("image", "").strip()
    if not image or len(image) > 600:
        raise NameInvalid({"image": image[:100]}, message="give an image: name[:tag]")
    result = await request.app[CONSOLE].inspect(request, image)
    return _no_store(web.json_response(result))


def setup_console(
    app: web.Application, settings: ConsoleConfig, cache: CacheSettings, *, redis: bool
) -> None:
    """Register the console's routes and its lifetime (after the app's own resources)."""
    app.router.add_get("/_regproxy/", handle_page)
    app.router.add_get("/_regproxy", handle_page)
    app.router.add_get("/_regproxy/static/{name}", handle_static)
    app.router.add_get("/_regproxy/api/summary", handle_summary)
    app.router.add_get("/_regproxy/api/history", handle_history)
    app.router.add_get("/_regproxy/api/inspect", handle_inspect)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        console = Console(app, settings, cache, redis=redis)
        app[CONSOLE] = console
        app[keys.OBSERVERS].append(console.observe)
        _watch_evictions(app[keys.CACHE], console)
        await console.start()
        try:
            yield
        finally:
            await console.stop()

    app.cleanup_ctx.append(lifetime)
