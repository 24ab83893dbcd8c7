"""``regproxy serve --workers N``: N processes on one port and one cache act as one proxy, with
no Redis: one upstream GET per blob however many workers' clients ask at once, every client
getting bytes while it downloads; a worker that dies is replaced; ``/metrics`` shows the host's
figures; SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme

from tests.harness.front import Drip, Front, Stall, blob, manifest
from tests.harness.images import seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.harness.seaweed import SeaweedS3
from tests.test_operations import metrics, pull, run_cli, seed_blobs, total_bytes, value
from tests.test_read_path import fetch, sha256
from tests.test_sync import (
    CHOSEN,
    INTERVAL,
    REPO,
    SLACK,
    chosen_content,
    holds_all,
    sync_proxy,
    sync_status,
    synced_digest,
    wait_for,
)

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]

MiB = 1024 * 1024
#: Clients at once: each connection lands on a worker by the hash of its address and port, so
#: with 16 the chance that one worker gets them all is 2**-15 (two workers).
CLIENTS = 16


def served_by(proxy: ProxyProcess, path: str) -> Counter[str]:
    """How many requests for ``path`` each worker answered (its access log lines)."""
    pattern = re.compile(r" (w\d+) INFO proxy\.access request method=GET path=(\S+) status=200")
    return Counter(m[1] for m in pattern.finditer(proxy.logs()) if m[2] == path)


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, float, float]:
    """Status, body, and when (monotonic) its first and its last byte came."""
    async with session.get(url) as resp:
        first = None
        body = bytearray()
        async for chunk in resp.content.iter_any():
            if first is None:
                first = time.monotonic()
            body += chunk
        return resp.status, bytes(body), first or time.monotonic(), time.monotonic()


def assert_streamed(results: list[tuple[int, bytes, float, float]]) -> None:
    """No client waited for the download to end: each had bytes before any had them all (the
    upstream drips the blob over 3 s, so a client served only from the committed blob has its
    first byte after another's last)."""
    firsts = sorted(first for _, _, first, _ in results)
    lasts = sorted(last for _, _, _, last in results)
    assert firsts[-1] < lasts[0], [round(t - firsts[0], 2) for t in firsts + lasts]


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


@pytest.mark.parametrize("workers", [2, 3])
async def test_workers_fetch_a_cold_blob_once_and_stream_it_to_every_client(
    workers: int,
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
) -> None:
    image = seed_image(
        registry, "library/many", "1", platforms=("linux/amd64",), layer_sizes=(3 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    # 3 s from upstream: every client asks while the download is under way
    upstream.add_fault(blob(digest, "GET"), Drip(MiB), times=5)
    proxy = proxy_factory(upstream.url, workers=workers)
    assert len(proxy.worker_pids()) == workers
    path = f"/v2/library/many/blobs/{digest}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        results = await asyncio.gather(
            *(timed_get(session, f"{proxy.url}{path}") for _ in range(CLIENTS))
        )
    for status, body, _, _ in results:
        assert status == 200 and sha256(body) == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert_streamed(results)
    served = served_by(proxy, path)
    assert sum(served.values()) == CLIENTS and len(served) >= 2, served

    # /metrics from any worker counts every worker's requests
    for _ in range(3):
        status, _, text = await fetch(f"{proxy.url}/metrics")
        assert status == 200
        counted = metric(
            text.decode(), 'regproxy_requests_total{method="GET",route="blob",status="200"}'
        )
        assert counted == CLIENTS
    assert 'regproxy_storage_errors_total{op="write"} 0.0' in text.decode()

    # warm: from disk, by every worker
    upstream.reset()
    status, _, body = await fetch(f"{proxy.url}{path}")
    assert status == 200 and sha256(body) == digest
    assert upstream.count() == 0


async def test_workers_of_replicas_sharing_redis_fetch_a_blob_once(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/fleet", "1", platforms=("linux/amd64",), layer_sizes=(3 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(MiB), times=5)
    volume = tmp_path / "volume"
    args = ["--redis", redis_server.url]
    replicas = [
        proxy_factory(upstream.url, storage=volume, extra_args=args, workers=2) for _ in range(2)
    ]
    path = f"/v2/library/fleet/blobs/{digest}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        results = await asyncio.gather(
            *(timed_get(session, f"{p.url}{path}") for p in replicas for _ in range(CLIENTS // 2))
        )
    for status, body, _, _ in results:
        assert status == 200 and sha256(body) == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert_streamed(results)


@pytest.mark.parametrize("fleet", [False, True], ids=["host", "redis"])
async def test_a_burst_of_pulls_costs_one_manifest_get(
    fleet: bool,
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Docker Hub's pull limit counts manifest GETs: CLIENTS pulls at once of one tag, over the
    workers of a host (or two replicas on one Redis), are one HEAD of the tag and one GET of each
    manifest upstream, and every client gets the exact bytes."""
    image = seed_image(registry, "library/burst", "1", platforms=("linux/amd64", "linux/arm64"))
    child = image.child("linux/arm64")
    upstream = front(registry)
    # each manifest request takes 1 s upstream: every client asks while the first is under way
    for ref in ("1", image.digest, child.digest):
        upstream.add_fault(manifest(ref), Stall(1.0), times=100)
    if fleet:
        args = ["--redis", redis_server.url]
        volume = tmp_path / "volume"
        proxies = [
            proxy_factory(upstream.url, storage=volume, extra_args=args, workers=2)
            for _ in range(2)
        ]
    else:
        proxies = [proxy_factory(upstream.url, workers=2)]
    urls = [p.url for p in proxies for _ in range(CLIENTS // len(proxies))]

    asked = [("1", image.digest, image.raw), (child.digest, child.digest, child.raw)]
    for ref, digest, raw in asked:
        path = f"/v2/library/burst/manifests/{ref}"
        results = await asyncio.gather(*(fetch(f"{url}{path}") for url in urls))
        for status, headers, body in results:
            assert status == 200 and body == raw, (status, body[:200])
            assert headers["Docker-Content-Digest"] == digest
        served = Counter[str]()
        for _ in range(50):  # a worker logs a request once its answer is sent
            served = Counter(f"{p.url} {w}" for p in proxies for w in served_by(p, path).elements())
            if sum(served.values()) == CLIENTS:
                break
            await asyncio.sleep(0.1)
        assert sum(served.values()) == CLIENTS and len(served) >= 2, served
    assert upstream.count("HEAD", "/manifests/1") == 1
    assert upstream.count("GET", "/manifests/1") == 0
    assert upstream.count("GET", f"/manifests/{image.digest}") == 1
    assert upstream.count("GET", f"/manifests/{child.digest}") == 1


async def test_workers_on_s3_fetch_once_and_share_the_local_tier(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/s3w", "1", platforms=("linux/amd64",), layer_sizes=(3 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(MiB), times=5)
    bucket = seaweed.bucket()
    work = tmp_path / "work"
    proxy = proxy_factory(
        upstream.url,
        storage=tmp_path / "unused",
        extra_args=["--storage", f"s3://{bucket}/cache", "--work-dir", str(work)],
        env=seaweed.env(),
        workers=2,
    )
    path = f"/v2/library/s3w/blobs/{digest}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        results = await asyncio.gather(
            *(timed_get(session, f"{proxy.url}{path}") for _ in range(CLIENTS))
        )
    for status, body, _, _ in results:
        assert status == 200 and sha256(body) == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert_streamed(results)
    # a blob one worker fetched alone is served by every worker from the one copy in the work
    # dir, not read again from the bucket
    config = image.child("linux/amd64").config_digest
    path = f"/v2/library/s3w/blobs/{config}"
    assert (await fetch(f"{proxy.url}{path}"))[0] == 200
    reads = 'regproxy_storage_requests_total{op="read",status="ok"}'
    before = metric((await fetch(f"{proxy.url}/metrics"))[2].decode(), reads)
    for _ in range(CLIENTS):
        status, headers, body = await fetch(f"{proxy.url}{path}")
        assert status == 200 and sha256(body) == config and headers["X-Cache"] == "HIT"
    assert len(served_by(proxy, path)) == 2
    assert metric((await fetch(f"{proxy.url}/metrics"))[2].decode(), reads) == before
    assert len(list((work / "tier").rglob(config[7:]))) == 1


async def test_the_size_bound_and_the_figures_are_the_hosts(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    limit = 4 * MiB
    images = seed_blobs(registry, "library/churn", 8, MiB)  # 2x the limit
    upstream = front(registry)
    proxy = proxy_factory(upstream.url, extra_args=["--max-size", str(limit)], workers=2)
    for image in images:  # two at a time, on new connections: both workers commit blobs
        await asyncio.gather(pull(proxy, image), pull(proxy, image))
        await asyncio.sleep(0.1)
    await pull(proxy, images[-1])  # a hit
    served = Counter(
        m[1] for m in re.finditer(r" (w\d) INFO proxy\.access .*/blobs/", proxy.logs())
    )
    assert len(served) == 2, served
    for _ in range(100):  # the one evicting worker hears of the other's commits within a second
        if total_bytes(proxy.storage) <= limit:
            break
        await asyncio.sleep(0.1)
    on_disk = total_bytes(proxy.storage)
    assert on_disk <= limit
    await asyncio.sleep(0.5)
    m = await metrics(proxy)
    assert value(m, "regproxy_storage_bytes") == on_disk
    assert value(m, "regproxy_evictions_total", kind="blob") >= 4
    status, _, body = await fetch(f"{proxy.url}/_regproxy/api/summary")
    assert status == 200 and json.loads(body)["storage"]["used_bytes"] == on_disk
    hits = value(m, "regproxy_cache_hits_total", kind="blob") + value(
        m, "regproxy_cache_hits_total", kind="manifest"
    )
    misses = value(m, "regproxy_cache_misses_total", kind="blob") + value(
        m, "regproxy_cache_misses_total", kind="manifest"
    )
    assert hits > 0 and misses > 0
    assert proxy.stop() == 0  # each worker saves its usage
    stats = json.loads(run_cli("cache", "stats", "--storage", str(proxy.storage), "--json").stdout)
    assert stats["used_bytes"] == on_disk
    assert (stats["hits"], stats["misses"]) == (hits, misses)


async def test_one_worker_runs_the_sync_schedule_and_any_reports_it(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = front(registry)
    image = seed_image(registry, REPO, "1.0", platforms=CHOSEN, layer_sizes=(50_000,))
    started = time.monotonic()
    proxy = sync_proxy(proxy_factory, upstream, tmp_path, workers=2)
    await wait_for(lambda: holds_all(proxy.storage, image), INTERVAL + SLACK, "synced")
    await asyncio.sleep(3 * INTERVAL)
    elapsed = time.monotonic() - started
    _, blobs = chosen_content(image)
    for digest in blobs:
        assert upstream.count("GET", f"/blobs/{digest}") == 1, digest
    checks = upstream.count("GET", "/tags/list")  # one schedule, not one per worker
    assert 1 <= checks <= elapsed / (INTERVAL * 0.8) + 2, (checks, elapsed)
    for _ in range(6):  # whichever worker answers
        assert synced_digest(await sync_status(proxy), "1.0") == image.digest


async def test_a_worker_that_dies_is_replaced_over_tls(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    image = seed_image(registry, "library/phoenix", "1", platforms=("linux/amd64",), single=True)
    upstream = front(registry)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    tls = ["--tls-cert", str(cert_file), "--tls-key", str(key_file)]
    proxy = proxy_factory(upstream.url, extra_args=tls, scheme="https", workers=2)
    context = ssl.create_default_context()
    ca.configure_trust(context)

    async def get(path: str) -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}{path}", ssl=context) as resp,
        ):
            return resp.status, await resp.read()

    before = proxy.worker_pids()
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    after = before
    while time.monotonic() < deadline:
        # service goes on meanwhile: the other worker answers (and then the new one)
        assert await get("/v2/library/phoenix/manifests/1") == (200, image.raw)
        after = proxy.worker_pids()
        if len(after) == 2 and before[0] not in after:
            break
        await asyncio.sleep(0.1)
    assert len(after) == 2 and before[0] not in after and before[1] in after
    assert "restarting" in proxy.logs()
    layer = image.child("linux/amd64").layers[0]
    path = f"/v2/library/phoenix/blobs/{layer}"
    for _ in range(CLIENTS):
        status, body = await get(path)
        assert status == 200 and sha256(body) == layer
    assert upstream.count("GET", f"/blobs/{layer}") == 1
    assert len(served_by(proxy, path)) == 2  # the new worker serves too

    # SIGHUP reaches every worker (each reloads the policy) and stops none
    assert proxy.pid is not None
    os.kill(proxy.pid, signal.SIGHUP)
    reloaded: set[str] = set()
    while len(reloaded) < 2 and time.monotonic() < deadline + 10:
        await asyncio.sleep(0.05)
        reloaded = set(re.findall(r" (w\d) INFO \S+ trust policy loaded", proxy.logs()))
    assert reloaded == {"w0", "w1"}
    assert sorted(proxy.worker_pids()) == sorted(after)


async def test_a_token_from_one_worker_is_good_on_every_worker(
    registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Without a configured signing key, the workers share the serve's random one."""
    image = seed_image(registry, "org/private", "1", platforms=("linux/amd64",), single=True)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'alice-pw', bcrypt.gensalt(4)).decode()}\n")
    config = tmp_path / "regproxy.yml"
    config.write_text(
        f'auth:\n  htpasswd: "{htpasswd}"\n  rules: [{{users: [alice], repositories: ["*"]}}]\n'
    )
    proxy = proxy_factory(registry.url, extra_args=["--config", str(config)], workers=2)
    login = base64.b64encode(b"alice:alice-pw").decode()
    scope = "repository:org/private:pull"
    status, _, body = await fetch(
        f"{proxy.url}/token?service=regproxy&scope={scope}",
        headers={"Authorization": f"Basic {login}"},
    )
    assert status == 200
    bearer = {"Authorization": f"Bearer {json.loads(body)['token']}"}
    path = "/v2/org/private/manifests/1"
    for _ in range(CLIENTS):  # a new connection each: both workers
        status, _, body = await fetch(f"{proxy.url}{path}", headers=bearer)
        assert (status, body) == (200, image.raw)
    assert len(served_by(proxy, path)) == 2


async def test_sigterm_drains_every_worker(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(
        registry, "library/drain", "1", platforms=("linux/amd64",), layer_sizes=(2 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(2 * MiB))  # 1 s
    proxy = proxy_factory(upstream.url, workers=2)
    workers = proxy.worker_pids()
    url = f"{proxy.url}/v2/library/drain/blobs/{digest}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        pulls = [asyncio.ensure_future(timed_get(session, url)) for _ in range(4)]
        await asyncio.sleep(0.4)  # under way
        assert not any(p.done() for p in pulls)
        stopping = asyncio.get_running_loop().run_in_executor(None, proxy.stop)
        results = await asyncio.gather(*pulls)
        assert await stopping == 0
    for status, body, _, _ in results:
        assert status == 200 and sha256(body) == digest
    assert all(_gone(pid) for pid in workers)
    assert "draining 2 workers" in proxy.logs()


def _gone(pid: int) -> bool:
    """No such process (or a zombie: it exited)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
