"""Replicas sharing one storage volume and one Redis behave as one cache."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import redis

from tests.harness.front import Drip, Front, blob
from tests.harness.images import seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.test_operations import pull, run_cli
from tests.test_read_path import fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]


async def test_two_replicas_fetch_each_blob_once(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/shared", "1", platforms=("linux/amd64",), layer_sizes=(3 * 1024 * 1024,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    # slow enough that both replicas are asked while the download is under way
    upstream.add_fault(blob(digest, "GET"), Drip(4 * 1024 * 1024), times=5)
    volume = tmp_path / "volume"
    args = ["--redis", redis_server.url]
    a = proxy_factory(upstream.url, storage=volume, extra_args=args)
    b = proxy_factory(upstream.url, storage=volume, extra_args=args)
    urls = [f"{p.url}/v2/library/shared/blobs/{digest}" for p in (a, b) for _ in range(6)]
    results = await asyncio.gather(*(fetch(u) for u in urls))
    for status, headers, body in results:
        assert status == 200 and sha256(body) == digest
        assert headers["Docker-Content-Digest"] == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1

    # a tag fetched through one replica is served by the other without asking upstream
    status, _, body = await fetch(f"{a.url}/v2/library/shared/manifests/1")
    assert body == image.raw
    upstream.reset()
    status, headers, body = await fetch(f"{b.url}/v2/library/shared/manifests/1")
    assert (status, body) == (200, image.raw)
    assert upstream.count() == 0


async def test_redis_going_away_never_fails_a_pull(
    registry: Registry, proxy_factory: ProxyFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    cached = seed_image(registry, "library/one", "1", platforms=("linux/amd64",), single=True)
    cold = seed_image(registry, "library/two", "1", platforms=("linux/amd64",), single=True)
    proxy = proxy_factory(registry.url, extra_args=["--redis", redis_server.url])
    await pull(proxy, cached)
    redis_server.stop()
    await pull(proxy, cached)  # from disk
    await pull(proxy, cold)  # from upstream, per replica
    assert "redis unavailable" in proxy.logs()


async def test_proxy_starts_without_redis(registry: Registry, proxy_factory: ProxyFactory) -> None:
    image = seed_image(registry, "library/three", "1", platforms=("linux/amd64",), single=True)
    proxy = proxy_factory(registry.url, extra_args=["--redis", "redis://127.0.0.1:9/0"])
    await pull(proxy, image)
    status, _, _ = await fetch(f"{proxy.url}/readyz")
    assert status == 200


async def test_peer_streaming_needs_the_fleet_secret(
    registry: Registry, proxy_factory: ProxyFactory, redis_server: RedisServer
) -> None:
    image = seed_image(registry, "library/peer", "1", platforms=("linux/amd64",), single=True)
    layer = image.child("linux/amd64").layers[0]
    alone = proxy_factory(registry.url)
    fleet = proxy_factory(registry.url, extra_args=["--redis", redis_server.url])
    await pull(fleet, image)
    for proxy in (alone, fleet):
        for headers in ({}, {"X-Regproxy-Peer": "guess"}):
            status, _, body = await fetch(
                f"{proxy.url}/_regproxy/peer/blobs/{layer}", headers=headers
            )
            assert status == 403 and b"DENIED" in body
    token = redis.Redis.from_url(redis_server.url).get("regproxy:peer-token")
    assert token
    status, headers, body = await fetch(
        f"{fleet.url}/_regproxy/peer/blobs/{layer}", headers={"X-Regproxy-Peer": token.decode()}
    )
    assert status == 200 and body == image.blobs[layer]


async def test_a_purged_tag_is_asked_of_upstream_again_by_every_replica(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """``regproxy cache purge`` leaves nothing of the image in Redis, and no replica answers the
    purged tag from a record it still holds: each asks upstream again."""
    image = seed_image(registry, "library/purged", "1", platforms=("linux/amd64",), single=True)
    other = seed_image(registry, "library/kept", "1", platforms=("linux/amd64",), single=True)
    upstream = front(registry)
    volume = tmp_path / "volume"
    args = ["--redis", redis_server.url]
    a = proxy_factory(upstream.url, storage=volume, extra_args=args)
    b = proxy_factory(upstream.url, storage=volume, extra_args=args)
    for proxy in (a, b):
        await pull(proxy, image)
        await pull(proxy, other)
    shared = redis.Redis.from_url(redis_server.url)
    image_digests = {image.digest, *image.blobs}

    def of_image() -> list[str]:
        """Redis keys naming library/purged, and access-set members of its digests."""
        keys = [k.decode() for k in shared.scan_iter("regproxy:*") if b"library/purged" in k]
        members = {m.decode() for m in shared.zrange("regproxy:access", 0, -1)}
        return keys + sorted(members & image_digests)

    assert of_image(), "the fleet keeps no record of the tag in Redis: nothing to check"
    upstream.reset()
    for proxy in (a, b):  # within the tag TTL both answer from the cache
        status, headers, body = await fetch(f"{proxy.url}/v2/library/purged/manifests/1")
        assert (status, headers["X-Cache"], body) == (200, "HIT", image.raw)
    assert upstream.count() == 0

    # a purge that cannot reach the fleet's Redis says so and leaves the store alone
    tag_record = volume / "repositories" / "docker.io" / "library" / "purged" / "_tags" / "1"
    algorithm, _, hexpart = image.digest.partition(":")
    manifest_file = volume / "manifests" / algorithm / hexpart[:2] / hexpart
    assert manifest_file.exists()
    assert tag_record.exists()
    away = ["--redis", "redis://127.0.0.1:9/0"]
    refused = run_cli(
        "cache", "purge", "library/purged", "--storage", str(volume), *away, check=False
    )
    assert refused.returncode == 1 and "redis" in refused.stderr, refused
    assert tag_record.exists()

    # Redis named in the environment (as a serve reads it), then with the flag
    runs: list[tuple[ProxyProcess, list[str], dict[str, str] | None]] = [
        (b, [], {"REGPROXY_REDIS": redis_server.url}),
        (a, args, None),
    ]
    for proxy, flags, env in runs:
        purged = run_cli(
            "cache", "purge", "library/purged", "--storage", str(volume), *flags, "--json", env=env
        )
        assert json.loads(purged.stdout)["tags"] == 1
        assert of_image() == []
        upstream.reset()
        status, headers, body = await fetch(f"{proxy.url}/v2/library/purged/manifests/1")
        assert (status, body) == (200, image.raw)
        assert headers["X-Cache"] == "MISS", proxy.url
        # the tag asked again, and the manifest fetched again (not served from memory)
        assert upstream.count(path_contains="/library/purged/manifests/1") >= 1, proxy.url
        assert upstream.count("GET", "/library/purged/manifests/") == 1, proxy.url
        assert manifest_file.exists()  # stored again
    # the other image kept its records and is still served from the cache
    upstream.reset()
    status, headers, body = await fetch(f"{a.url}/v2/library/kept/manifests/1")
    assert (status, headers["X-Cache"], body) == (200, "HIT", other.raw)
    assert upstream.count() == 0
    shared.close()
