"""The composition root: builds regproxy's services from a :class:`~proxy.config.Config`, stores
them under the typed keys of :mod:`proxy.registry.keys`, and wires the routes of the registry
API (:mod:`proxy.registry.routes`), the operator's console and scheduled sync (:mod:`proxy.ops`).

Resources (storage, upstream sessions, Redis, services) are created in ``cleanup_ctx`` before
its ``yield`` and closed after it, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from typing import cast

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from proxy.access.auth import Authenticator
from proxy.access.routing import Router
from proxy.cache.blobs import BlobService
from proxy.cache.links import Links
from proxy.cache.manifests import ManifestService
from proxy.cache.referrers import ReferrersService
from proxy.config import Config
from proxy.core.errors import StorageError, error_middleware
from proxy.core.metrics import Metrics, UsageStats
from proxy.fetch.upstream import Upstreams
from proxy.ops.console import setup_console
from proxy.ops.sync import SYNC, SyncService, handle_sync_status
from proxy.platforms.service import PlatformService
from proxy.registry.keys import (
    AUTH,
    BLOBS,
    CACHE,
    DRAINING,
    LINKS,
    MANIFESTS,
    METRICS,
    OBSERVERS,
    PLATFORMS,
    REFERRERS,
    ROUTER,
    STORAGE,
    TRUST,
    UPSTREAMS,
    USAGE,
)
from proxy.registry.middleware import AccessLogger, api_headers_middleware
from proxy.registry.routes import add_routes, handle_other
from proxy.trust.service import TrustService
from proxy.trust.settings import TrustSettings
from storage import ContentStore, create_store
from storage.base import MetadataStore
from storage.eviction import CacheManager
from storage.host import (
    HostCoordinator,
    HostCounter,
    HostFlight,
    HostOverFleet,
    HostWindows,
    Worker,
)
from storage.identity import StoreClaim, StoreMismatch, store_identity
from storage.redis import RedisCoordinator, RedisFlight, RedisMetadata
from storage.redis import close as close_redis
from storage.redis import connect as connect_redis

__all__ = ["AccessLogger", "advertise_url", "create_app", "drain", "reload_policy"]

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
#: This process as one of the workers of ``serve --workers N``; absent: the only process.
WORKER = web.AppKey("worker", Worker)


def create_app(config: Config, *, worker: Worker | None = None) -> web.Application:
    app = web.Application(
        middlewares=[api_headers_middleware, error_middleware],
        client_max_size=1024,
        handler_args={"max_line_size": 8190, "max_field_size": 8190},
    )
    app[CONFIG] = config
    if worker is not None:
        app[WORKER] = worker
    app[METRICS] = Metrics(
        multiprocess=None if worker is None else str(worker.metrics_dir),
        upstreams=config.upstreams,
    )
    app[AUTH] = Authenticator(config.auth, Router(config.upstreams, config.default_upstream))
    app[AUTH].throttle.on_throttled = app[METRICS].logins_throttled.inc
    app.cleanup_ctx.append(_resources)
    app[OBSERVERS] = []
    app[DRAINING] = asyncio.Event()
    add_routes(app)
    # /_regproxy/ and /_regproxy/api/...: proxy.ops.console
    setup_console(app, config.console, config.cache, redis=config.redis_url is not None)
    app.router.add_get("/_regproxy/sync", _sync_status_of_host)
    app.router.add_route("*", "/{path:.*}", handle_other)
    return app


def reload_policy(app: web.Application, settings: TrustSettings) -> None:
    """SIGHUP: take a new ``policy:``; verdicts reached under the old one no longer count."""
    if TRUST in app:
        app[TRUST].reload(settings)


async def _sync_status_of_host(request: web.Request) -> web.StreamResponse:
    """``GET /_regproxy/sync``; with workers, worker 0's (it runs the schedule)."""
    worker = request.app.get(WORKER)
    if worker is None or worker.index == 0:
        return await handle_sync_status(request)
    request["route"] = "sync"
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    try:
        url = (worker.run_dir / "peer-0").read_text()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{url}/_regproxy/sync", headers=headers) as resp,
        ):
            body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() in _PASSED_ON}
            return web.Response(body=body, status=resp.status, headers=kept)
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        raise web.HTTPServiceUnavailable(
            text=f"the sync schedule's worker did not answer ({type(exc).__name__})"
        ) from exc


_PASSED_ON = {"content-type", "www-authenticate", "docker-distribution-api-version"}


async def drain(app: web.Application, seconds: float) -> None:
    """Stopping: downloads finish or are handed over
    (:meth:`proxy.fetch.downloads.Downloads.drain`)."""
    await app[BLOBS].fetcher.drain(seconds)


def advertise_url(config: Config) -> str:
    """Where other replicas reach this one: configured, else from the listen address."""
    if config.advertise_url:
        return config.advertise_url
    host, port = config.listen_address
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.tls_cert else "http"
    return f"{scheme}://{host}:{port}"


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    worker = app.get(WORKER)
    work = config.work
    if worker is not None:  # the workers of a host share the local read tier (storage.tier)
        work = dataclasses.replace(work, max_size=work.max_size // worker.count)
    storage = create_store(config.storage, config.s3, work)
    storage.driver.on_request = metrics.storage_request
    storage.on_error = lambda op: metrics.storage_errors.labels(op).inc()
    await storage.open()
    upstreams = Upstreams(config.upstreams)
    for upstream in upstreams.by_name.values():
        upstream.metrics = metrics
    await upstreams.start()
    app[STORAGE] = storage
    app[UPSTREAMS] = upstreams
    app[ROUTER] = Router(config.upstreams, config.default_upstream)
    if worker is not None:  # where the other workers reach this one
        (worker.run_dir / f"peer-{worker.index}").write_text(worker.peer_url)
    interval = 60.0 if config.cache.blob_ttl is None else min(60.0, config.cache.blob_ttl / 2)
    shared = None if worker is None else HostCounter(worker.run_dir / "used")
    cache = CacheManager(
        storage,
        config.cache,
        interval=max(0.5, interval),
        shared=shared,
        accountant=worker is None or worker.index == 0,  # one worker lists and evicts
    )
    metrics.storage_limit.set(cache.limit or 0)
    cache.on_size = metrics.storage_bytes.set
    cache.on_evict = lambda kind, digest, size: metrics.evictions.labels(kind).inc()
    cache.on_error = lambda op: metrics.storage_errors.labels(op).inc()
    app[CACHE] = cache
    app[BLOBS] = BlobService(
        storage,
        offline=config.offline,
        metrics=metrics,
        cache=cache,
        redirect_expiry=config.s3.redirect_expiry if config.s3 and config.s3.redirect else None,
        advertise_url=advertise_url(config),
    )
    inflight = None
    if metrics.multiprocess is None:
        metrics.inflight.set_function(lambda: len(app[BLOBS].downloads))
    else:  # the workers' files hold values, not functions: look four times a second
        inflight = asyncio.create_task(_count_downloads(app))
    meta: MetadataStore = storage
    redis_client = claim = None
    host: HostCoordinator | None = None
    windows = None
    if worker is not None:
        host = HostCoordinator(worker.run_dir, token=worker.token)
        app[AUTH].throttle.host = windows = HostWindows(worker.run_dir / "windows")
    if host is not None and not config.redis_url:
        # the fleet's interface (proxy.fetch.fleet), on this host's files instead of Redis
        app[BLOBS].coordinator = cast(RedisCoordinator, host)
        app[BLOBS].fetcher.advertise_url = worker.peer_url if worker else None
        app[BLOBS].fetcher.peer_token = worker.token if worker else None
    if config.redis_url:
        redis_client = connect_redis(config.redis_url)
        claim = await _claim_store(redis_client, storage, upstreams)
        meta = RedisMetadata(redis_client, storage)
        coordinator = RedisCoordinator(redis_client, storage.instance)
        app[BLOBS].coordinator = coordinator
        app[BLOBS].fetcher.peer_token = await coordinator.peer_token()
        cache.coordinator = coordinator
        app[AUTH].throttle.redis = redis_client
        if host is not None and worker is not None:
            layered = HostOverFleet(coordinator, host, worker.peer_url)
            app[BLOBS].coordinator = cast(RedisCoordinator, layered)
            app[BLOBS].fetcher.peer_token = app[BLOBS].fetcher.peer_token or worker.token
    app[MANIFESTS] = ManifestService(storage, meta, offline=config.offline)
    host_flight = None
    if redis_client is not None:  # one manifest GET for the fleet (its workers included)
        app[MANIFESTS].flight = RedisFlight(redis_client, storage.instance)
    elif worker is not None:  # ... or for this host's workers
        app[MANIFESTS].flight = host_flight = HostFlight(worker.run_dir / "flights")
    app[LINKS] = Links(meta, offline=config.offline)
    app[REFERRERS] = ReferrersService(app[MANIFESTS], meta, offline=config.offline)
    app[PLATFORMS] = PlatformService(
        config.platforms,
        manifests=app[MANIFESTS],
        blobs=app[BLOBS],
        meta=meta,
        upstreams=upstreams,
        router=app[ROUTER],
    )
    app[TRUST] = TrustService(
        config.policy,
        manifests=app[MANIFESTS],
        blobs=app[BLOBS],
        meta=meta,
        upstreams=upstreams,
        default_upstream=config.default_upstream,
        referrers=app[REFERRERS],
        platforms=app[PLATFORMS],
        metrics=metrics,
    )
    log.info(
        "regproxy ready storage=%s upstreams=%s default=%s advertise=%s",
        storage.driver.location,
        ",".join(f"{n}={u.url}" for n, u in config.upstreams.items()),
        config.default_upstream,
        app[BLOBS].fetcher.advertise_url,
    )
    usage = UsageStats(
        None if worker is None or worker.index == 0 else f"{socket.gethostname()}.w{worker.index}"
    )
    await usage.load(storage)
    app[USAGE] = usage
    await cache.start()
    saver = asyncio.create_task(_save_usage(usage, upstreams, storage))
    app[SYNC] = SyncService(
        config.sync,
        upstreams=upstreams,
        manifests=app[MANIFESTS],
        platforms=app[PLATFORMS],
        blobs=app[BLOBS],
        links=app[LINKS],
        cache=cache,
        metrics=metrics,
        redis=redis_client,
        instance=storage.instance,
        auth=app[AUTH],
    )
    if worker is None or worker.index == 0:  # one worker of a host runs the schedule
        app[SYNC].start()
    try:
        yield
    finally:
        await app[SYNC].stop()
        if inflight is not None:
            inflight.cancel()
        saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saver
        await _save_usage_now(usage, upstreams, storage)
        await cache.stop()
        await app[BLOBS].close()
        await upstreams.close()
        if claim is not None:
            await claim.stop()
        if redis_client is not None:
            await close_redis(redis_client)
        if host is not None:
            host.close()
        if host_flight is not None:
            host_flight.close()
        if windows is not None:
            app[AUTH].throttle.host = None
            windows.close()
        if shared is not None:
            shared.close()
        await storage.close()


async def _count_downloads(app: web.Application) -> None:
    """Downloads this worker makes (not those it follows: the host's figure counts each once)."""
    while True:
        running = app[BLOBS].downloads.values()
        app[METRICS].inflight.set(sum(1 for dl in running if dl.source != "peer"))
        await asyncio.sleep(0.25)


async def _claim_store(client: Redis, storage: ContentStore, upstreams: Upstreams) -> StoreClaim:
    """Record the store in Redis; refuse to start if its replicas use another one
    (``storage.identity``)."""
    ident, described = await store_identity(storage)
    claim = StoreClaim(client, ident, described, storage.instance)
    try:
        await claim.check()
    except StoreMismatch:
        await close_redis(client)
        await upstreams.close()
        await storage.close()
        raise
    claim.start()
    return claim


async def _save_usage_now(usage: UsageStats, upstreams: Upstreams, store: ContentStore) -> None:
    for name, upstream in upstreams.by_name.items():
        if upstream.ratelimit_remaining is not None:
            usage.ratelimit[name] = upstream.ratelimit_remaining
    try:
        await usage.save(store)
    except StorageError as exc:
        log.error("cannot save usage stats error=%s", exc)


async def _save_usage(
    usage: UsageStats, upstreams: Upstreams, store: ContentStore, every: float = 15.0
) -> None:
    while True:
        await asyncio.sleep(every)
        await _save_usage_now(usage, upstreams, store)
