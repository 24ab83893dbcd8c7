"""What wraps every request: the access log line and request metrics, the API version header.
(The JSON error envelope is rendered by :func:`proxy.core.errors.error_middleware`.)"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from proxy.core.errors import Handler, RegistryError
from proxy.core.metrics import Metrics, UsageStats
from proxy.fetch.download import CACHE_RESULT, Cache
from proxy.registry.keys import METRICS, OBSERVERS, USAGE

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}


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
            for observer in app.get(OBSERVERS, ()):
                observer(request, response)


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
