"""The typed keys under which the composition root (:mod:`proxy.app`) stores services on the
aiohttp application, and the keys a request carries for logging and metrics.

Every layer that serves HTTP reads its services through these keys; only :mod:`proxy.app` sets
them. Imports the service types only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_response import StreamResponse

from proxy.access.auth import Authenticator
from proxy.access.routing import Router
from proxy.cache.blobs import BlobService
from proxy.cache.links import Links
from proxy.cache.manifests import ManifestService
from proxy.cache.referrers import ReferrersService
from proxy.core.metrics import Metrics, UsageStats
from proxy.fetch.upstream import Upstreams
from proxy.platforms.service import PlatformService
from proxy.trust.service import TrustService
from storage import ContentStore
from storage.eviction import CacheManager

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
TRUST = web.AppKey("trust", TrustService)
#: Set on SIGTERM (``proxy.server``): /readyz answers 503 while the replica drains.
DRAINING = web.AppKey("draining", asyncio.Event)
#: Called with each finished request and its response (the console's per-repository figures).
OBSERVERS = web.AppKey("observers", list[Callable[[web.Request, StreamResponse], None]])
