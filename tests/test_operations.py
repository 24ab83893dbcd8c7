"""Operating the cache: metrics, readiness, eviction, offline mode, admin commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.front import Front, Status
from tests.harness.images import SeededImage, SeededRegistry, seed_image, tag_image
from tests.harness.proxyproc import REPO_ROOT, ProxyProcess
from tests.harness.registry import Registry
from tests.test_read_path import error_code, fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
MiB = 1024 * 1024


def total_bytes(root: Path) -> int:
    """Bytes of committed blobs and manifests under a storage directory."""
    return sum(
        p.stat().st_size
        for kind in ("blobs", "manifests")
        for p in (root / kind).glob("*/*/*")
        if not p.name.endswith(".type")
    )


async def metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await fetch(f"{proxy.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def pull(proxy: ProxyProcess, image: SeededImage, platform: str | None = None) -> None:
    """Pull one platform of an image like a client; assert every byte."""
    base = f"{proxy.url}/v2/{image.repository}"
    status, _, body = await fetch(f"{base}/manifests/{image.tag}")
    assert (status, body) == (200, image.raw)
    child = image.child(platform or next(iter(image.children)))
    if not image.single:
        status, _, body = await fetch(f"{base}/manifests/{child.digest}")
        assert (status, body) == (200, child.raw)
    for digest in (child.config_digest, *child.layers):
        status, _, data = await fetch(f"{base}/blobs/{digest}")
        assert status == 200 and sha256(data) == digest


def run_cli(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``regproxy ARGS`` from the repository root; ``env`` is added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        cwd=REPO_ROOT,
        env={**os.environ, **env} if env else None,
    )


async def test_metrics_count_what_happened(
    seeded_registry: SeededRegistry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=["--max-size", "1GiB"])
    image = seeded_registry["library/redis:7"]
    digest = image.child("linux/amd64").layers[0]
    size = len(image.blobs[digest])
    url = f"{proxy.url}/v2/library/redis/blobs/{digest}"
    assert (await fetch(url))[1]["X-Cache"] == "MISS"
    assert (await fetch(url))[1]["X-Cache"] == "HIT"
    await asyncio.sleep(0.2)  # request metrics are recorded once the body is sent
    m = await metrics(proxy)
    assert value(m, "regproxy_cache_misses_total", kind="blob") == 1
    assert value(m, "regproxy_cache_hits_total", kind="blob") == 1
    assert value(m, "regproxy_cache_served_bytes_total", source="upstream") == size
    assert value(m, "regproxy_cache_served_bytes_total", source="cache") == size
    assert value(m, "regproxy_upstream_bytes_total", upstream="docker.io") == size
    assert value(m, "regproxy_requests_total", method="GET", route="blob", status="200") == 2
    assert value(
        m, "regproxy_upstream_requests_total", upstream="docker.io", method="GET", status="200"
    ) == upstream.count("GET")
    assert value(m, "regproxy_inflight_downloads") == 0
    assert value(m, "regproxy_storage_bytes") == total_bytes(proxy.storage) == size
    assert value(m, "regproxy_storage_limit_bytes") == 1024**3
    assert value(m, "regproxy_request_duration_seconds_count", route="blob") == 2
    assert value(m, "regproxy_evictions_total", kind="blob") == 0


async def test_ratelimit_and_stale_metrics(
    seeded_registry: SeededRegistry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=["--tag-ttl", "0s"])
    image = seeded_registry["library/hello:latest"]
    headers = {
        "Content-Type": image.media_type,
        "Docker-Content-Digest": image.digest,
        "ratelimit-limit": "100;w=21600",
        "ratelimit-remaining": "17;w=21600",
    }
    upstream.add_fault(
        lambda r: r.method == "GET" and "/manifests/" in r.path, Status(200, headers, image.raw)
    )
    status, got, body = await fetch(f"{proxy.url}/v2/library/hello/manifests/latest")
    assert (status, body) == (200, image.raw)
    upstream.upstream = "http://127.0.0.1:9"  # upstream gone: the cached tag is served stale
    status, got, body = await fetch(f"{proxy.url}/v2/library/hello/manifests/latest")
    assert (status, got["X-Cache"], body) == (200, "STALE", image.raw)
    await asyncio.sleep(0.2)
    m = await metrics(proxy)
    assert value(m, "regproxy_upstream_ratelimit_remaining", upstream="docker.io") == 17
    assert value(m, "regproxy_stale_served_total") == 1
    # the front answers 502 for its dead upstream; regproxy retried before serving stale
    assert (
        value(
            m, "regproxy_upstream_requests_total", upstream="docker.io", method="HEAD", status="502"
        )
        == 4
    )


async def test_health_and_readiness(proxy_factory: ProxyFactory, registry: Registry) -> None:
    proxy = proxy_factory(registry.url)
    status, _, body = await fetch(f"{proxy.url}/healthz")
    assert status == 200
    status, _, body = await fetch(f"{proxy.url}/readyz")
    assert (status, json.loads(body)["status"]) == (200, "ready")


def seed_blobs(registry: Registry, repository: str, count: int, size: int) -> list[SeededImage]:
    return [
        seed_image(
            registry,
            repository,
            f"t{i}",
            platforms=("linux/amd64",),
            single=True,
            layer_sizes=(size,),
        )
        for i in range(count)
    ]


async def test_eviction_keeps_the_disk_bounded_under_load(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    limit = 4 * MiB
    pinned = seed_image(
        registry,
        "library/postgres",
        "16.1",
        platforms=("linux/amd64",),
        single=True,
        layer_sizes=(MiB // 2,),
    )
    images = seed_blobs(registry, "library/churn", 12, MiB)  # ~3x the limit
    config = tmp_path / "c.yml"
    config.write_text(f"cache:\n  max_size: {limit}\n  pin: ['library/postgres:16*']\n")
    upstream = front(registry)
    proxy = proxy_factory(upstream.url, extra_args=["--config", str(config)])
    await pull(proxy, pinned)
    peak = 0

    async def pinned_and_recent() -> None:
        for _ in range(30):
            await pull(proxy, pinned)
            await asyncio.sleep(0.05)

    async def churn() -> None:
        nonlocal peak
        for image in images:
            await pull(proxy, image)
            await pull(proxy, image)  # recently used: still served right
            await asyncio.sleep(0.2)  # give the background pass its turn
            peak = max(peak, total_bytes(proxy.storage))

    await asyncio.gather(churn(), pinned_and_recent())
    for _ in range(50):
        if total_bytes(proxy.storage) <= limit:
            break
        await asyncio.sleep(0.1)
    assert total_bytes(proxy.storage) <= limit
    assert peak <= limit + MiB + 64 * 1024, "more than one blob over the limit at once"
    child = pinned.child("linux/amd64")
    for digest in (child.config_digest, *child.layers):
        blob = proxy.storage / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert blob.exists(), "a pinned blob was evicted"
    m = await metrics(proxy)
    assert value(m, "regproxy_evictions_total", kind="blob") >= 6
    assert value(m, "regproxy_storage_bytes") <= limit
    # an evicted blob is simply fetched again
    first = images[0].child("linux/amd64").layers[0]
    before = upstream.count("GET", f"/blobs/{first}")
    await pull(proxy, images[0])
    assert upstream.count("GET", f"/blobs/{first}") == before + 1


async def test_blob_ttl_expires_unused_content(
    registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    image = seed_image(registry, "library/short", "1", platforms=("linux/amd64",), single=True)
    config = tmp_path / "c.yml"
    config.write_text("cache:\n  blob_ttl: 1s\n")
    proxy = proxy_factory(registry.url, extra_args=["--config", str(config)])
    await pull(proxy, image)
    assert total_bytes(proxy.storage) > 0
    for _ in range(40):
        await asyncio.sleep(0.25)
        if total_bytes(proxy.storage) == 0:
            break
    assert total_bytes(proxy.storage) == 0
    await pull(proxy, image)  # and comes back on the next pull


async def test_accounting_rebuilt_after_crash(
    seeded_registry: SeededRegistry, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(seeded_registry.url)
    await pull(proxy, seeded_registry["library/busybox:1.36"], "linux/arm64/v8")
    proxy.kill9()
    proxy.start()
    m = await metrics(proxy)
    assert value(m, "regproxy_storage_bytes") == total_bytes(proxy.storage) > 0


async def test_offline_serves_cache_only(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    upstream = front(seeded_registry.registry)
    storage = tmp_path / "shared"
    warm = proxy_factory(upstream.url, storage=storage, extra_args=["--tag-ttl", "0s"])
    image = seeded_registry["library/alpine:3.19"]
    await pull(warm, image, "linux/arm/v7")
    warm.stop()
    upstream.reset()
    offline = proxy_factory(upstream.url, storage=storage, extra_args=["--offline"])
    await pull(offline, image, "linux/arm/v7")
    amd = image.child("linux/amd64")
    status, _, body = await fetch(f"{offline.url}/v2/library/alpine/manifests/{amd.digest}")
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    status, _, body = await fetch(f"{offline.url}/v2/library/alpine/blobs/{amd.layers[0]}")
    assert status == 404 and error_code(body) == "BLOB_UNKNOWN"
    status, _, body = await fetch(f"{offline.url}/v2/library/busybox/manifests/1.36")
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    assert upstream.count() == 0


async def test_cache_stats_purge_gc_verify(
    registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    a = seed_image(
        registry,
        "library/app",
        "a",
        platforms=("linux/amd64",),
        single=True,
        layer_sizes=(300_000,),
    )
    c = tag_image(registry, a, "c")
    b = seed_image(registry, "library/app", "b", platforms=("linux/amd64",), single=True)
    proxy = proxy_factory(registry.url)
    for image in (a, c, b, a):
        await pull(proxy, image)
    proxy.stop()  # stats are saved on the way down
    storage = str(proxy.storage)
    stats = json.loads(run_cli("cache", "stats", "--storage", storage, "--json").stdout)
    assert stats["used_bytes"] == total_bytes(proxy.storage)
    assert stats["top_by_pulls"][0] == {"repository": "docker.io/library/app", "pulls": 4}
    assert stats["misses"] > 0 and stats["hits"] > 0
    assert stats["top_by_bytes"][0]["repository"] == "docker.io/library/app"
    text = run_cli("cache", "stats", "--storage", storage).stdout
    assert "hit ratio" in text and "docker.io/library/app" in text

    a_layer = a.child("linux/amd64").layers[0]
    blob = proxy.storage / "blobs" / "sha256" / a_layer[7:9] / a_layer[7:]
    purged = json.loads(run_cli("cache", "purge", "app:a", "--storage", storage, "--json").stdout)
    assert purged["tags"] == 1 and blob.exists()  # tag c still uses it
    purged = json.loads(run_cli("cache", "purge", "app:c", "--storage", storage, "--json").stdout)
    assert purged["tags"] == 1 and not blob.exists()
    b_layer = b.child("linux/amd64").layers[0]
    assert (proxy.storage / "blobs" / "sha256" / b_layer[7:9] / b_layer[7:]).exists()

    # gc: a dead process's temp files and a half-written manifest
    dead = proxy.storage / "tmp" / "deadbeef"
    dead.mkdir(parents=True)
    (dead / ".lock").touch()
    (dead / "partial").write_bytes(b"x" * 1000)
    orphan = proxy.storage / "manifests" / "sha256" / "00" / ("00" * 32 + ".type")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_text("application/json")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    freed = json.loads(run_cli("gc", "--storage", storage, "--json").stdout)
    assert freed["details"] == {"temp": 1, "manifest-type": 1}
    assert not dead.exists() and not orphan.exists()

    # verify: a corrupted blob is found, quarantined, and fetched again on the next pull
    b_blob = proxy.storage / "blobs" / "sha256" / b_layer[7:9] / b_layer[7:]
    data = bytearray(b_blob.read_bytes())
    data[10] ^= 0xFF
    b_blob.write_bytes(bytes(data))
    result = run_cli("verify", "--storage", storage, "--json", check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [c["digest"] for c in report["corrupt"]] == [b_layer]
    assert not b_blob.exists()
    assert run_cli("verify", "--storage", storage).returncode == 0
    proxy.start()
    await pull(proxy, b)


def test_admin_commands_refuse_a_missing_directory(tmp_path: Path) -> None:
    result = run_cli("verify", "--storage", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("is not a directory")
