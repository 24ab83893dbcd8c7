"""Prometheus metrics (``GET /metrics``), one registry per app.

=========================================  ==========================================
metric                                     what
=========================================  ==========================================
regproxy_requests_total{method,route,status}   client requests answered
regproxy_request_duration_seconds{route}   time to answer (histogram; body included)
regproxy_cache_hits_total{kind}            blob|manifest served from the cache (STALE too)
regproxy_cache_misses_total{kind}          blob|manifest fetched from upstream
regproxy_stale_served_total                manifests/tag lists served stale (upstream failed)
regproxy_cache_served_bytes_total{source}  body bytes served, cache|upstream
regproxy_upstream_requests_total{upstream,method,status}  requests to upstreams ("error": none)
regproxy_upstream_bytes_total{upstream}    blob bytes received from upstreams
regproxy_upstream_ratelimit_remaining{upstream}  Docker Hub's ``ratelimit-remaining``
regproxy_storage_bytes                     bytes of blobs and manifests on disk
regproxy_storage_limit_bytes               ``cache.max_size`` (0: unbounded)
regproxy_evictions_total{kind}             files removed by eviction
regproxy_inflight_downloads                blob downloads from upstream in progress
regproxy_storage_errors_total{op}          storage failures (never silent misses)
regproxy_storage_requests_total{op,status}  requests to the object store (S3): ok|not_found|error
regproxy_storage_request_duration_seconds{op}  their latency (histogram)
regproxy_sync_runs_total{result}           scheduled sync checks of an entry: success, error,
                                           ratelimited (paused by the floor or a 429), skipped
                                           (another replica holds the entry's lease)
regproxy_sync_last_success_timestamp_seconds{repository}  end of the last successful check
regproxy_sync_bytes_total                  blob and manifest bytes sync fetched from upstream
regproxy_trust_verifications_total{result}  signature checks of a digest (trust policy):
                                           verified|failed (recorded verdicts are not counted)
regproxy_trust_refusals_total{rule,entry}  manifest requests refused by the trust policy:
                                           deny|allow_tags|require_signature, entry 1, 2, ...
regproxy_logins_throttled_total            logins answered 429: too many failures from the address
=========================================  ==========================================

Series whose labels are known before any request (every ``kind``, ``source``, sync ``result``,
storage ``op`` and configured ``upstream``) are there from the start, at 0.

With worker processes (``serve --workers N``) every worker writes its figures to files in a
directory of the run (prometheus-client's multiprocess mode) and ``/metrics``, from whichever
worker answers, shows the host's: counters and histograms summed, gauges as noted per gauge
(``inflight`` summed over live workers, sizes the most recent value).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from storage.content import ContentStore
from storage.errors import StorageError

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

#: What ``storage.errors.StorageError.op`` says, and the eviction's own "evict".
STORAGE_ERROR_OPS = ("read", "write", "delete", "list", "open", "key", "evict", "other")


class Metrics:
    """The process's metrics; ``multiprocess``: the directory the workers of a host share."""

    def __init__(self, *, multiprocess: str | None = None, upstreams: Iterable[str] = ()) -> None:
        self.multiprocess = multiprocess
        if multiprocess is not None and not getattr(values.ValueClass, "_multiprocess", False):
            # chosen once at import from PROMETHEUS_MULTIPROC_DIR; a forked worker sets it here
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: What to read figures from: the host's (all workers) or this process's registry.
        self.view = r
        if multiprocess is not None:
            self.view = CollectorRegistry()
            MultiProcessCollector(self.view, path=multiprocess)  # type: ignore[no-untyped-call]
        self.requests = Counter(
            "regproxy_requests",
            "Client requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "regproxy_request_duration_seconds",
            "Time to answer a request, body included",
            ["route"],
            registry=r,
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
            ),
        )
        self.hits = Counter("regproxy_cache_hits", "Served from the cache", ["kind"], registry=r)
        self.misses = Counter(
            "regproxy_cache_misses", "Fetched from upstream", ["kind"], registry=r
        )
        self.stale = Counter(
            "regproxy_stale_served", "Served stale because upstream failed", registry=r
        )
        self.served_bytes = Counter(
            "regproxy_cache_served_bytes", "Body bytes served", ["source"], registry=r
        )
        self.upstream_requests = Counter(
            "regproxy_upstream_requests",
            "Requests to upstream registries",
            ["upstream", "method", "status"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "regproxy_upstream_bytes",
            "Blob bytes received from upstreams",
            ["upstream"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "regproxy_upstream_ratelimit_remaining",
            "Docker Hub's ratelimit-remaining",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.storage_bytes = Gauge(
            "regproxy_storage_bytes",
            "Bytes of blobs and manifests on disk",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.storage_limit = Gauge(
            "regproxy_storage_limit_bytes",
            "cache.max_size (0: unbounded)",
            registry=r,
            multiprocess_mode="max",
        )
        self.evictions = Counter(
            "regproxy_evictions", "Files removed by eviction", ["kind"], registry=r
        )
        self.inflight = Gauge(
            "regproxy_inflight_downloads",
            "Blob downloads from upstream in progress",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.storage_errors = Counter(
            "regproxy_storage_errors", "Storage failures", ["op"], registry=r
        )
        self.storage_requests = Counter(
            "regproxy_storage_requests",
            "Requests to the object store",
            ["op", "status"],
            registry=r,
        )
        self.storage_duration = Histogram(
            "regproxy_storage_request_duration_seconds",
            "Latency of requests to the object store",
            ["op"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.sync_runs = Counter(
            "regproxy_sync_runs", "Scheduled sync checks of an entry", ["result"], registry=r
        )
        self.sync_last_success = Gauge(
            "regproxy_sync_last_success_timestamp_seconds",
            "Unix time a sync entry last checked and fetched successfully",
            ["repository"],
            registry=r,
            multiprocess_mode="max",
        )
        self.sync_bytes = Counter(
            "regproxy_sync_bytes", "Bytes scheduled sync fetched from upstream", registry=r
        )
        self.trust_verifications = Counter(
            "regproxy_trust_verifications",
            "Signature verifications of a digest (not answered from a recorded verdict)",
            ["result"],
            registry=r,
        )
        self.trust_refusals = Counter(
            "regproxy_trust_refusals",
            "Manifest requests refused by the trust policy",
            ["rule", "entry"],
            registry=r,
        )
        self.logins_throttled = Counter(
            "regproxy_logins_throttled",
            "Logins answered 429 after too many failed logins from the client's address",
            registry=r,
        )
        for result in ("success", "error", "ratelimited", "skipped"):
            self.sync_runs.labels(result)
        for kind in ("blob", "manifest"):
            self.hits.labels(kind)
            self.misses.labels(kind)
            self.evictions.labels(kind)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for op in STORAGE_ERROR_OPS:
            self.storage_errors.labels(op)
        for upstream in upstreams:
            self.upstream_bytes.labels(upstream)

    def storage_request(self, op: str, status: str, seconds: float) -> None:
        """One request to the object store (``storage.base.StorageDriver.on_request``)."""
        self.storage_requests.labels(op, status).inc()
        self.storage_duration.labels(op).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.view)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value as ``/metrics`` shows it (the host's), 0 when absent."""
        return self.view.get_sample_value(name, labels or {}) or 0.0


class UsageStats:
    """What ``regproxy cache stats`` reads from the store: hits, misses, pulls per repository.

    Kept in ``stats/<host>.json`` of the store, one per replica (``stats/<host>.w<i>.json`` for
    worker ``i`` > 0 of a host), continued across restarts.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = f"stats/{name or socket.gethostname()}.json"
        self.hits = 0
        self.misses = 0
        self.pulls: Tally[str] = Tally()
        self.ratelimit: dict[str, int] = {}

    async def load(self, store: ContentStore) -> None:
        with contextlib.suppress(StorageError, ValueError, TypeError, AttributeError):
            previous = json.loads(await store.get_file(self.name) or b"{}")
            self.hits = int(previous.get("hits", 0))
            self.misses = int(previous.get("misses", 0))
            self.pulls.update({str(k): int(v) for k, v in previous.get("pulls", {}).items()})

    async def save(self, store: ContentStore) -> None:
        doc = {
            "hits": self.hits,
            "misses": self.misses,
            "pulls": dict(self.pulls.most_common(1000)),
            "ratelimit_remaining": self.ratelimit,
            "updated_at": time.time(),
        }
        await store.put_file(self.name, json.dumps(doc).encode())
