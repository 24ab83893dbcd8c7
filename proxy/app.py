"""The HTTP face: Docker Registry HTTP API V2 / OCI distribution, pull side.

Routes::

    GET        /v2/                              API version check (and login, with auth)
    GET|HEAD   /v2/<name>/manifests/<reference>  proxy.platforms -> proxy.cache.manifests
    GET|HEAD   /v2/<name>/blobs/<digest>         proxy.cache.blobs
    GET        /v2/<name>/tags/list              proxy.cache.manifests (tags_list)
    GET|HEAD   /v2/<name>/referrers/<digest>     proxy.cache.referrers (OCI 1.1, ?artifactType=)
    *          /v2/...                           405 UNSUPPORTED for anything that would write
    GET        /healthz, /readyz, /metrics       process up; storage usable; Prometheus
    GET        /_regproxy/inspect?image=         platforms served for a tag, with sources
    GET|POST   /token                            Bearer tokens, with auth (proxy.access.tokens)
    GET        /_regproxy/peer/blobs/<digest>    another replica streams a download (shared secret)
    GET        /_regproxy/, /_regproxy/api/...   operator's console and its JSON (proxy.ops.console)
    GET        /_regproxy/sync                   scheduled sync: entries, tags, digests, runs

Every /v2/ request is routed to an upstream (``proxy.access.routing``), checked against the access rules
(``proxy.access.auth``) and, for digests, against what the repository is known to hold (``proxy.cache.links``)
before anything is looked up.

Resources (storage, upstream sessions, services) are created in ``cleanup_ctx`` and live under
typed ``web.AppKey`` keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from proxy.access.auth import Authenticator, load_auth
from proxy.access.routing import Router
from proxy.cache.blobs import BlobService, stream_download
from proxy.cache.links import Links
from proxy.cache.manifests import Manifest, ManifestService
from proxy.cache.referrers import ReferrersService
from proxy.config import Config
from proxy.core.errors import (
    BlobUnknown,
    Denied,
    Handler,
    ManifestInvalid,
    NameInvalid,
    RegistryError,
    StorageError,
    Unsupported,
    error_middleware,
)
from proxy.core.metrics import CONTENT_TYPE_LATEST, Metrics, UsageStats
from proxy.core.reference import check_digest, check_name, check_reference, is_digest, parse_image
from proxy.fetch.download import CACHE_RESULT, PEER_HEADER, Cache
from proxy.fetch.upstream import INDEX_TYPES, OCI_INDEX, Upstream, Upstreams
from proxy.ops.console import CONSOLE, setup_console
from proxy.ops.sync import SYNC, SyncService, handle_sync_status
from proxy.platforms.service import PlatformService, accepts_index, load_platforms
from storage import ContentStore, create_store
from storage.base import MetadataStore
from storage.eviction import CacheManager
from storage.redis import RedisCoordinator, RedisMetadata
from storage.redis import connect as connect_redis

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
STORAGE = web.AppKey("storage", ContentStore)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
ROUTER = web.AppKey("router", Router)
BLOBS = web.AppKey("blobs", BlobService)
MANIFESTS = web.AppKey("manifests", ManifestService)
PLATFORMS = web.AppKey("platforms", PlatformService)
METRICS = web.AppKey("metrics", Metrics)
USAGE = web.AppKey("usage", UsageStats)
AUTH = web.AppKey("auth", Authenticator)
LINKS = web.AppKey("links", Links)
CACHE = web.AppKey("cache", CacheManager)
REFERRERS = web.AppKey("referrers", ReferrersService)

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = ("GET", "HEAD")


class AccessLogger(AbstractAccessLogger):
    """One line per request once its body was sent (method, path, status, bytes, time, cache),
    and the request metrics, which need that same moment."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        cache = response.headers.get("X-Cache", "-")
        if request.get(CACHE_RESULT) is Cache.ABORTED:
            cache = "ABORTED"
        self.logger.info(
            "request method=%s path=%s status=%d bytes=%d duration=%.3f cache=%s",
            request.method,
            request.raw_path,  # as received (percent-encoded): no forged lines through %0a
            response.status,
            response.body_length,
            time,
            cache,
        )
        app = _app_of(request)
        if app is not None and METRICS in app:
            assert isinstance(request, web.Request)
            observe(app[METRICS], request, response, time, cache)
            if USAGE in app:
                count_usage(app[USAGE], request, response, cache)
            if CONSOLE in app:
                app[CONSOLE].observe(request, response)


def _app_of(request: BaseRequest) -> web.Application | None:
    """The app that handled ``request``; None when it never got that far (a TLS probe on the
    plain port, an unparsable request line), where aiohttp's ``request.app`` asserts."""
    if not isinstance(request, web.Request):
        return None
    try:
        return request.app
    except (AssertionError, AttributeError):
        return None


def observe(
    metrics: Metrics, request: BaseRequest, response: StreamResponse, duration: float, cache: str
) -> None:
    route = request.get("route", "other")
    metrics.requests.labels(request.method, route, str(response.status)).inc()
    metrics.duration.labels(route).observe(duration)
    kind = request.get("kind")
    if kind is None or not 200 <= response.status < 300:
        return
    if cache in ("HIT", "STALE"):
        metrics.hits.labels(kind).inc()
        if cache == "STALE":
            metrics.stale.inc()
    elif cache in ("MISS", "ABORTED"):
        metrics.misses.labels(kind).inc()
    if request.method == "GET":
        source = "cache" if cache in ("HIT", "STALE") else "upstream"
        sent = response.content_length if cache != "ABORTED" else None
        metrics.served_bytes.labels(source).inc(sent or 0)


def count_usage(
    usage: UsageStats, request: web.Request, response: StreamResponse, cache: str
) -> None:
    if request.get("kind") is None or not 200 <= response.status < 300:
        return
    if cache in ("HIT", "STALE"):
        usage.hits += 1
    elif cache in ("MISS", "ABORTED"):
        usage.misses += 1
    if request.get("pull"):
        usage.pulls[request["pull"]] += 1


@web.middleware
async def api_headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except RegistryError as exc:
        exc.headers = {**API_HEADERS, **exc.headers}
        raise
    if not resp.prepared:
        resp.headers.update(API_HEADERS)
    return resp


def split_path(path: str) -> tuple[str, str, str]:
    """``name/manifests/ref`` -> ``(name, "manifests", ref)``; the last marker wins."""
    for kind in ("manifests", "blobs"):
        name, sep, ref = path.rpartition(f"/{kind}/")
        if sep and name and ref and "/" not in ref:
            return name, kind, ref
    name, sep, rest = path.rpartition("/tags/")
    if sep and name and rest == "list":
        return name, "tags", "list"
    raise web.HTTPNotFound()


async def _route(request: web.Request, name: str) -> tuple[Upstream, str]:
    """The upstream and repository a request is for, once the client may pull it."""
    if len(name) > 512:
        raise NameInvalid({"name": name[:300]})
    check_name(name)
    upstream_name, repository = request.app[ROUTER].route(name, request.query.get("ns"))
    auth = request.app[AUTH]
    if auth.enabled:
        await auth.check(request, name, upstream_name, repository)
    return request.app[UPSTREAMS][upstream_name], repository


async def handle_base(request: web.Request) -> web.Response:
    request["route"] = "base"
    if request.method not in READ_METHODS:
        raise Unsupported({"method": request.method})
    await request.app[AUTH].check_base(request)
    return web.json_response({}, headers=API_HEADERS)


async def handle_token(request: web.Request) -> web.StreamResponse:
    """``/token``: the Bearer token service (``proxy.access.tokens``), when client auth is on."""
    request["route"] = "token"
    auth = request.app[AUTH]
    if not auth.enabled:
        raise web.HTTPNotFound()
    return await auth.token_endpoint(request)


async def handle_v2(request: web.Request) -> web.StreamResponse:
    if request.method not in READ_METHODS:
        raise Unsupported({"method": request.method})
    name, kind, ref = split_path(request.match_info["path"])
    request["route"] = {"blobs": "blob", "manifests": "manifest", "tags": "tags"}[kind]
    if kind != "tags":
        request["kind"] = request["route"]  # blob | manifest: what hit/miss metrics count
    if kind == "blobs":
        check_name(name)
        check_digest(ref)
        upstream, repository = await _route(request, name)
        return await serve_blob(request, upstream, repository, ref)
    if kind == "manifests":
        check_name(name)
        check_reference(ref)
        upstream, repository = await _route(request, name)
        if request.method == "GET" and not is_digest(ref):
            request["pull"] = f"{upstream.name}/{repository}"
        return await serve_manifest(request, upstream, repository, ref)
    upstream, repository = await _route(request, name)
    return await serve_tags(request, upstream, repository)


async def serve_blob(
    request: web.Request, upstream: Upstream, repository: str, digest: str
) -> web.StreamResponse:
    links, blobs = request.app[LINKS], request.app[BLOBS]
    source, src_repo = await request.app[PLATFORMS].source_of(upstream, repository, digest)
    fetched_here = False
    if not await links.linked(upstream.name, repository, digest):
        if await blobs.held_elsewhere(digest, source, src_repo):
            await links.confirm(
                source, src_repo, digest, "blobs", as_upstream=upstream.name, as_repo=repository
            )
        else:
            fetched_here = True  # fetched from `repository` itself: that is the confirmation
    resp = await blobs.serve(request, source, src_repo, digest)
    if fetched_here and request.method == "GET" and request.get(CACHE_RESULT) is not Cache.ABORTED:
        await links.link(upstream.name, repository, [digest])
    return resp


async def serve_manifest(
    request: web.Request, upstream: Upstream, repository: str, reference: str
) -> web.StreamResponse:
    head = request.method == "HEAD"
    platforms, links = request.app[PLATFORMS], request.app[LINKS]
    manifest: Manifest
    if is_digest(reference):
        # Cached for another repository: only if upstream says this one holds it too.
        if (
            not await links.linked(upstream.name, repository, reference)
            and await request.app[MANIFESTS].local(reference) is not None
        ):
            source, src_repo = await platforms.source_of(upstream, repository, reference)
            await links.confirm(
                source,
                src_repo,
                reference,
                "manifests",
                as_upstream=upstream.name,
                as_repo=repository,
            )
        manifest = await platforms.child_manifest(upstream, repository, reference, head=head)
    else:
        manifest = await platforms.by_tag(upstream, repository, reference, head=head)
        # Clients send one Accept line per type (dockerd, containers/image): read them all.
        accept = ",".join(request.headers.getall("Accept", []))
        if manifest.media_type in INDEX_TYPES and not accepts_index(accept):
            manifest = await platforms.for_client(
                upstream,
                repository,
                manifest,
                None,
                user_agent=request.headers.get("User-Agent", ""),
                head=head,
            )
    await links.link_manifest(upstream.name, repository, manifest)
    headers = {
        "Docker-Content-Digest": manifest.digest,
        "Content-Type": manifest.media_type,
        "X-Cache": manifest.cache,
        "ETag": f'"{manifest.digest}"',
    }
    if manifest.data is not None:
        return web.Response(body=manifest.data, headers=headers)
    # A HEAD answered from what upstream's HEAD said: no bytes here, only their length.
    resp = web.StreamResponse(headers=headers)
    resp.content_length = manifest.size
    return resp


async def handle_referrers(request: web.Request) -> web.StreamResponse:
    """``/v2/<name>/referrers/<digest>``: an OCI index of the manifests naming the digest."""
    request["route"] = "referrers"
    if request.method not in READ_METHODS:
        raise Unsupported({"method": request.method})
    name = request.match_info["name"]
    check_name(name)
    digest = check_digest(request.match_info["digest"])
    upstream, repository = await _route(request, name)
    artifact_type = request.query.get("artifactType", "")[:255] or None
    answer = await request.app[REFERRERS].get(upstream, repository, digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX, "X-Cache": answer.cache}
    if answer.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=answer.body, headers=headers)


async def serve_tags(request: web.Request, upstream: Upstream, repository: str) -> web.Response:
    query = {}
    for key in ("n", "last"):
        if key in request.query:
            value = request.query[key]
            if key == "n" and (not value.isdigit() or len(value) > 9):
                raise ManifestInvalid({"n": value[:50]}, message="n must be a number")
            query[key] = value
    body, headers, cache = await request.app[MANIFESTS].tags_list(upstream, repository, query)
    return web.Response(
        body=body, content_type="application/json", headers={**headers, "X-Cache": cache}
    )


async def handle_inspect(request: web.Request) -> web.Response:
    """``GET /_regproxy/inspect?image=NAME[:TAG]``: the platforms served for a tag, with sources."""
    image = request.query.get("image", "")
    ref = parse_image(image)
    upstream, repository = await _route(request, ref.repository)
    manifest, entries = await request.app[PLATFORMS].describe(
        upstream, repository, ref.tag or "latest"
    )
    return web.json_response(
        {
            "image": f"{upstream.name}/{repository}:{ref.tag or 'latest'}",
            "digest": manifest.digest,
            "media_type": manifest.media_type,
            "platforms": [e.describe() for e in entries],
        }
    )


async def handle_healthz(request: web.Request) -> web.Response:
    request["route"] = "healthz"
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Ready when the store takes writes, is reachable and is not full."""
    request["route"] = "readyz"
    problems = await request.app[STORAGE].check_ready()
    cache = request.app[CACHE]
    if cache.full:
        problems.append(f"cache full: {cache.used} of {cache.limit} bytes in use")
    status = 503 if problems else 200
    return web.json_response(
        {"status": "unready" if problems else "ready", "problems": problems}, status=status
    )


async def handle_metrics(request: web.Request) -> web.Response:
    request["route"] = "metrics"
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_peer_blob(request: web.Request) -> web.StreamResponse:
    """Another replica streams a blob this one is downloading (or holds locally)."""
    request["route"] = "peer"
    blobs = request.app[BLOBS]
    token = blobs.fetcher.peer_token
    offered = request.headers.get(PEER_HEADER, "")
    if not token or not secrets.compare_digest(offered.encode(), token.encode()):
        raise Denied(message="peer requests need the fleet's secret")
    digest = request.match_info["digest"]
    check_digest(digest)
    dl = blobs.downloads.get(digest)
    if dl is not None and not dl.done and dl.source != "peer":
        await dl.started
        return await stream_download(request, dl, digest, blobs.store)
    local = blobs.store.local_blob(digest)
    if local is None:
        raise BlobUnknown({"digest": digest})
    return web.FileResponse(local.path, headers={"Docker-Content-Digest": digest})


async def handle_other(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[api_headers_middleware, error_middleware],
        client_max_size=1024,
        handler_args={"max_line_size": 8190, "max_field_size": 8190},
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(
        load_auth(config.auth), Router(config.upstreams, config.default_upstream)
    )
    app.cleanup_ctx.append(_resources)
    app.router.add_route("*", "/v2/", handle_base)
    app.router.add_route("*", "/v2", handle_base)
    app.router.add_route("*", "/v2/{name:.+}/referrers/{digest}", handle_referrers)
    app.router.add_route("*", "/v2/{path:.+}", handle_v2)
    app.router.add_get("/healthz", handle_healthz, allow_head=True)
    app.router.add_get("/readyz", handle_readyz, allow_head=True)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/_regproxy/inspect", handle_inspect)
    app.router.add_route("*", "/token", handle_token)
    app.router.add_get("/_regproxy/peer/blobs/{digest}", handle_peer_blob)
    setup_console(app)  # /_regproxy/ and /_regproxy/api/...: proxy.ops.console
    app.router.add_get("/_regproxy/sync", handle_sync_status)
    app.router.add_route("*", "/{path:.*}", handle_other)
    return app


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
    storage = create_store(config.storage, config.s3, config.work)
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
    interval = 60.0 if config.cache.blob_ttl is None else min(60.0, config.cache.blob_ttl / 2)
    cache = CacheManager(storage, config.cache, interval=max(0.5, interval))
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
    metrics.inflight.set_function(lambda: len(app[BLOBS].downloads))
    meta: MetadataStore = storage
    redis_client = None
    if config.redis_url:
        redis_client = connect_redis(config.redis_url)
        meta = RedisMetadata(redis_client, storage)
        coordinator = RedisCoordinator(redis_client, storage.instance)
        app[BLOBS].coordinator = coordinator
        app[BLOBS].fetcher.peer_token = await coordinator.peer_token()
        cache.coordinator = coordinator
    app[MANIFESTS] = ManifestService(storage, meta, offline=config.offline)
    app[LINKS] = Links(meta, offline=config.offline)
    app[REFERRERS] = ReferrersService(app[MANIFESTS], meta, offline=config.offline)
    app[PLATFORMS] = PlatformService(
        load_platforms(config.platforms),
        manifests=app[MANIFESTS],
        blobs=app[BLOBS],
        meta=meta,
        upstreams=upstreams,
        router=app[ROUTER],
    )
    log.info(
        "regproxy ready storage=%s upstreams=%s default=%s advertise=%s",
        storage.driver.location,
        ",".join(f"{n}={u.url}" for n, u in config.upstreams.items()),
        config.default_upstream,
        app[BLOBS].fetcher.advertise_url,
    )
    usage = UsageStats()
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
    app[SYNC].start()
    try:
        yield
    finally:
        await app[SYNC].stop()
        saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saver
        await _save_usage_now(usage, upstreams, storage)
        await cache.stop()
        await app[BLOBS].close()
        await upstreams.close()
        if redis_client is not None:
            await redis_client.aclose()
        await storage.close()


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
