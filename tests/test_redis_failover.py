"""Redis that fails over: replicas on a Sentinel-managed Redis keep pulling when its primary dies.

A primary, one replica and a sentinel (Debian's ``redis-sentinel``) on loopback ports; two regproxy
replicas on one shared volume reach Redis through ``redis+sentinel://``. The primary is SIGKILLed
while both replicas stream a slow blob to their clients; the sentinel promotes the replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.config import build_config
from proxy.core.settings import ConfigError
from storage.redis import parse_sentinel_url
from tests.harness.front import Drip, Front, blob
from tests.harness.images import seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisSentinel, RedisServer
from tests.harness.registry import Registry
from tests.test_read_path import fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
MiB = 1024 * 1024


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    """(primary, replica, sentinel), the replica in sync and known to the sentinel."""
    primary = RedisServer(tmp_path / "redis-primary").start()
    replica = RedisServer(tmp_path / "redis-replica", replica_of=primary)
    sentinel = RedisSentinel(tmp_path / "sentinel", primary)
    try:
        replica.start()
        sentinel.start()
        sentinel.wait_for_replicas(1)
        yield primary, replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()


async def fetch_everywhere(proxies: list[ProxyProcess], digest: str, each: int) -> None:
    urls = [f"{p.url}/v2/library/ha/blobs/{digest}" for p in proxies for _ in range(each)]
    for status, headers, body in await asyncio.gather(*(fetch(u) for u in urls)):
        assert status == 200 and sha256(body) == digest
        assert headers["Docker-Content-Digest"] == digest


async def test_pulls_go_on_while_sentinel_promotes_a_replica(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    sentinel_redis: tuple[RedisServer, RedisServer, RedisSentinel],
    tmp_path: Path,
) -> None:
    primary, replica, sentinel = sentinel_redis
    image = seed_image(
        registry, "library/ha", "1", platforms=("linux/amd64",), layer_sizes=(4 * MiB, 3 * MiB)
    )
    during, after = image.child("linux/amd64").layers
    upstream = front(registry)
    upstream.add_fault(blob(during, "GET"), Drip(2 * MiB), times=2)  # about 2 s
    volume = tmp_path / "volume"
    args = ["--redis", sentinel.url]
    proxies = [proxy_factory(upstream.url, storage=volume, extra_args=args) for _ in range(2)]
    assert sentinel.master_port() == primary.port

    # The primary dies while both replicas stream `during` to three clients each.
    pulls = asyncio.ensure_future(fetch_everywhere(proxies, during, 3))
    await asyncio.sleep(0.7)
    assert not pulls.done()
    primary.kill9()
    await pulls  # every client got every byte, verified
    assert upstream.count("GET", f"/blobs/{during}") == 1

    # Once the sentinel has promoted the replica, the fleet fetches each blob once again.
    await asyncio.to_thread(sentinel.wait_for_master, replica.port)
    upstream.add_fault(blob(after, "GET"), Drip(3 * MiB), times=2)
    await fetch_everywhere(proxies, after, 3)
    assert upstream.count("GET", f"/blobs/{after}") == 1
    for proxy in proxies:
        assert proxy.running


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:s3cret@sentinel:26379", "needs the service name"),
        ("redis+sentinel://:s3cret@sentinel:port/mymaster", "is not HOST:PORT"),
        ("redis+sentinel://sentinel/mymaster/zero", "database 'zero' is not a number"),
        ("redis+sentinel://sentinel/mymaster?tls=1", "unknown parameter 'tls'"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_the_key(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"redis": {"url": url}})
    assert caught.value.key == "redis.url" and problem in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_sentinel_url_names_sentinels_service_database_and_passwords() -> None:
    url = "redis+sentinel://:pw@10.0.0.1:26380,[fd00::2],sentinel-3/mymaster/2?sentinel_password=sp"
    assert build_config({"redis": {"url": url}}).redis_url == url
    target = parse_sentinel_url(url)
    assert target.sentinels == (("10.0.0.1", 26380), ("fd00::2", 26379), ("sentinel-3", 26379))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "pw")
    assert target.sentinel_password == "sp"
