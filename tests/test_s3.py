"""The cache on a real object store: pulls, replicas with no shared disk, faults.

Every proxy here runs with ``--storage s3://BUCKET/cache`` and its own ``--work-dir``; the
credentials and endpoint come from the standard AWS environment, as in production. Tests taking
``object_store`` run on SeaweedFS and on Ceph's RADOS Gateway (``[seaweedfs]``/``[rgw]``); the
others on SeaweedFS only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.harness.front import Drip, Front, blob
from tests.harness.images import seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.harness.s3store import S3Store
from tests.harness.seaweed import SeaweedS3
from tests.test_operations import pull, run_cli
from tests.test_read_path import fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
MiB = 1024 * 1024


def blob_key(digest: str) -> str:
    return f"cache/blobs/sha256/{digest[7:9]}/{digest[7:]}"


async def stored(server: S3Store, bucket: str, *digests: str) -> None:
    """Wait (bounded) until these blobs are in the bucket and no upload is in progress: clients
    get their verified last byte just before the upload's completion."""
    keys = {blob_key(d) for d in digests}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if keys <= server.keys(bucket, "cache/").keys() and not server.uploads(bucket):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not stored in time: {keys}")


def s3_proxy(
    proxy_factory: ProxyFactory,
    server: S3Store,
    bucket: str,
    upstream_url: str,
    work: Path,
    *args: str,
    env: dict[str, str] | None = None,
) -> ProxyProcess:
    return proxy_factory(
        upstream_url,
        storage=work.parent / f"{work.name}-unused",
        extra_args=["--storage", f"s3://{bucket}/cache", "--work-dir", str(work), *args],
        env={**server.env(), **(env or {})},
    )


def run_admin(server: S3Store, *args: str) -> subprocess.CompletedProcess[str]:
    """A regproxy admin command against the test store (credentials in the environment)."""
    return run_cli(*args, check=False, env=server.env())


async def test_pull_through_s3_then_a_fresh_replica_serves_it_all(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry,
        "library/s3img",
        "1",
        platforms=("linux/amd64", "linux/arm64"),
        layer_sizes=(9 * MiB, 200_000),
    )
    upstream = front(registry)
    bucket = object_store.bucket()
    first = s3_proxy(proxy_factory, object_store, bucket, upstream.url, tmp_path / "w1")
    for platform in image.children:
        await pull(first, image, platform)
    # every blob sits under its content key with exactly its bytes
    await stored(object_store, bucket, *image.blobs)
    keys = object_store.keys(bucket, "cache/")
    for digest, data in image.blobs.items():
        assert keys[blob_key(digest)] == len(data)
        got = object_store.client().get_object(Bucket=bucket, Key=blob_key(digest))["Body"].read()
        assert got == data
    assert object_store.uploads(bucket) == []
    # the first replica serves from its local tier; a new one with an empty work dir from S3
    upstream.reset()
    second = s3_proxy(proxy_factory, object_store, bucket, upstream.url, tmp_path / "w2")
    for platform in image.children:
        await pull(second, image, platform)
    assert upstream.count() == 0
    # ranges come straight from the bucket; blobs larger than the local tier still stream whole
    layer = image.child("linux/amd64").layers[0]
    third = s3_proxy(
        proxy_factory,
        object_store,
        bucket,
        upstream.url,
        tmp_path / "w3",
        "--work-max-size",
        "1MiB",
    )
    status, headers, body = await fetch(
        f"{third.url}/v2/library/s3img/blobs/{layer}", headers={"Range": "bytes=100-199"}
    )
    assert status == 206 and body == image.blobs[layer][100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(image.blobs[layer])}"
    for _ in range(2):
        status, _, body = await fetch(f"{third.url}/v2/library/s3img/blobs/{layer}")
        assert status == 200 and body == image.blobs[layer]
    assert not list((tmp_path / "w3" / "tier").rglob("*/sha256/*/*"))  # 9 MiB > 1 MiB tier
    assert upstream.count() == 0
    metrics = (await fetch(f"{third.url}/metrics"))[2].decode()
    assert 'regproxy_storage_requests_total{op="read",status="ok"}' in metrics


async def test_three_replicas_one_upstream_get_per_blob(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/fleet", "1", platforms=("linux/amd64",), layer_sizes=(6 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    # slow enough that every replica is asked while the download is under way
    upstream.add_fault(blob(digest, "GET"), Drip(4 * MiB), times=5)
    bucket = seaweed.bucket()
    replicas = [
        s3_proxy(
            proxy_factory,
            seaweed,
            bucket,
            upstream.url,
            tmp_path / f"w{i}",
            "--redis",
            redis_server.url,
        )
        for i in range(3)
    ]
    urls = [f"{p.url}/v2/library/fleet/blobs/{digest}" for p in replicas for _ in range(4)]
    results = await asyncio.gather(*(fetch(u) for u in urls))
    for status, headers, body in results:
        assert status == 200 and sha256(body) == digest
        assert headers["Docker-Content-Digest"] == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    await stored(seaweed, bucket, digest)
    # a tag fetched by one replica is served by the others without asking upstream
    status, _, body = await fetch(f"{replicas[0].url}/v2/library/fleet/manifests/1")
    assert (status, body) == (200, image.raw)
    upstream.reset()
    for replica in replicas[1:]:
        status, _, body = await fetch(f"{replica.url}/v2/library/fleet/manifests/1")
        assert (status, body) == (200, image.raw)
    assert upstream.count() == 0


async def test_corrupted_object_is_never_served_and_is_replaced(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/rot", "1", platforms=("linux/amd64",), layer_sizes=(2 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    bucket = seaweed.bucket()
    first = s3_proxy(proxy_factory, seaweed, bucket, upstream.url, tmp_path / "w1")
    await pull(first, image)
    await stored(seaweed, bucket, digest)
    flipped = bytearray(image.blobs[digest])
    flipped[len(flipped) // 2] ^= 0xFF
    seaweed.client().put_object(Bucket=bucket, Key=blob_key(digest), Body=bytes(flipped))
    # a replica without the blob on its disk reads the bucket: the bad bytes never complete
    second = s3_proxy(proxy_factory, seaweed, bucket, upstream.url, tmp_path / "w2")
    url = f"{second.url}/v2/library/rot/blobs/{digest}"
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(url)
    assert blob_key(digest) not in seaweed.keys(bucket, "cache/")  # removed, not kept
    status, _, body = await fetch(url)  # fetched again from upstream
    assert status == 200 and body == image.blobs[digest]
    await stored(seaweed, bucket, digest)
    got = seaweed.client().get_object(Bucket=bucket, Key=blob_key(digest))["Body"].read()
    assert got == image.blobs[digest]
    # verify finds and removes a corrupted object, and says so with exit 1
    seaweed.client().put_object(Bucket=bucket, Key=blob_key(digest), Body=bytes(flipped))
    verify = run_admin(seaweed, "verify", "--storage", f"s3://{bucket}/cache", "--json")
    assert verify.returncode == 1, verify.stderr
    assert digest in verify.stdout
    assert blob_key(digest) not in seaweed.keys(bucket, "cache/")


async def test_kill9_mid_upload_leaves_nothing_visible_and_is_cleaned(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/crash", "1", platforms=("linux/amd64",), layer_sizes=(14 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(2 * MiB))  # ~7 s for the blob
    bucket = object_store.bucket()
    work = tmp_path / "w"
    proxy = s3_proxy(proxy_factory, object_store, bucket, upstream.url, work)
    url = f"{proxy.url}/v2/library/crash/blobs/{digest}"
    client = asyncio.ensure_future(fetch(url))
    deadline = time.monotonic() + 30
    while not object_store.uploads(bucket) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    assert object_store.uploads(bucket), "the first part should be uploading by now"
    proxy.kill9()
    with pytest.raises(aiohttp.ClientPayloadError):
        await client
    assert blob_key(digest) not in object_store.keys(bucket, "cache/")
    upstream.clear_faults()
    proxy.start()  # same work dir: the dead process's upload is aborted
    assert object_store.uploads(bucket) == []
    assert "aborted multipart uploads left by a previous run" in proxy.logs()
    status, _, body = await fetch(url)
    assert status == 200 and body == image.blobs[digest]


async def test_object_store_down_readyz_503_and_pulls_still_verified(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    tmp_path: Path,
) -> None:
    image = seed_image(registry, "library/down", "1", platforms=("linux/amd64",), single=True)
    cold = seed_image(registry, "library/cold", "1", platforms=("linux/amd64", "linux/arm64"))
    upstream = front(registry)
    bucket = object_store.bucket()
    proxy = s3_proxy(proxy_factory, object_store, bucket, upstream.url, tmp_path / "w")
    assert (await fetch(f"{proxy.url}/readyz"))[0] == 200
    object_store.stop()  # radosgw stops in ~0.2 s: within the second readiness is cached
    try:
        deadline = time.monotonic() + 5
        status, _, body = await fetch(f"{proxy.url}/readyz")
        while status == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            status, _, body = await fetch(f"{proxy.url}/readyz")
        assert status == 503 and b"object store unreachable" in body
        child = image.child("linux/amd64")
        for digest in (child.config_digest, *child.layers):
            status, _, data = await fetch(f"{proxy.url}/v2/library/down/blobs/{digest}")
            assert status == 200 and data == image.blobs[digest]
        await pull(proxy, cold, "linux/arm64")  # tags, indexes, manifests: from upstream
    finally:
        object_store.start()
    deadline = time.monotonic() + 20
    while (await fetch(f"{proxy.url}/readyz"))[0] != 200 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    assert (await fetch(f"{proxy.url}/readyz"))[0] == 200
    await pull(proxy, image)


async def test_redirect_to_presigned_url(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    tmp_path: Path,
) -> None:
    image = seed_image(registry, "library/redir", "1", platforms=("linux/amd64",), single=True)
    upstream = front(registry)
    bucket = object_store.bucket()
    first = s3_proxy(proxy_factory, object_store, bucket, upstream.url, tmp_path / "w1")
    await pull(first, image)
    await stored(object_store, bucket, *image.blobs)
    second = s3_proxy(
        proxy_factory,
        object_store,
        bucket,
        upstream.url,
        tmp_path / "w2",
        env={"REGPROXY_S3_REDIRECT": "true"},
    )
    layer = image.child("linux/amd64").layers[0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{second.url}/v2/library/redir/blobs/{layer}", allow_redirects=False) as resp,
    ):
        assert resp.status == 307
        location = resp.headers["Location"]
    assert location.startswith(object_store.endpoint) and "X-Amz-Signature" in location
    async with aiohttp.ClientSession() as session, session.get(location) as resp:
        assert resp.status == 200 and await resp.read() == image.blobs[layer]


def test_missing_bucket_stops_start_up_with_one_line(object_store: S3Store, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "s3://no-such-bucket-here/x",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **object_store.env()},
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-bucket-here" in lines[0], proc.stderr


def test_bad_credentials_stop_start_up_with_one_line(object_store: S3Store, tmp_path: Path) -> None:
    bucket = object_store.bucket()
    env = {**os.environ, **object_store.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            f"s3://{bucket}/x",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and bucket in lines[0], proc.stderr


async def test_eviction_bounds_the_bucket_and_stats_read_it(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    tmp_path: Path,
) -> None:
    images = [
        seed_image(
            registry,
            f"library/ev{i}",
            "1",
            platforms=("linux/amd64",),
            layer_sizes=(MiB,),
            single=True,
        )
        for i in range(4)
    ]
    upstream = front(registry)
    bucket = object_store.bucket()
    limit = 3 * MiB
    proxy = s3_proxy(
        proxy_factory, object_store, bucket, upstream.url, tmp_path / "w", "--max-size", str(limit)
    )

    def stored() -> int:
        return sum(
            size
            for key, size in object_store.keys(bucket, "cache/").items()
            if key.startswith(("cache/blobs/", "cache/manifests/")) and not key.endswith(".type")
        )

    for image in images:
        await pull(proxy, image)
    # clients get their last byte before the upload completes: wait for the uploads to land
    # (and no download to run), then for eviction to bring the bucket under the limit
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = (await fetch(f"{proxy.url}/metrics"))[2].decode()
        idle = "regproxy_inflight_downloads 0.0" in metrics and not object_store.uploads(bucket)
        if idle and stored() <= limit:
            break
        await asyncio.sleep(0.5)
    assert 0 < stored() <= limit
    metrics = (await fetch(f"{proxy.url}/metrics"))[2].decode()
    assert 'regproxy_evictions_total{kind="blob"}' in metrics
    # the most recent image is still whole; the oldest was evicted and comes back on demand
    upstream.reset()
    await pull(proxy, images[-1])
    assert upstream.count("GET", "/blobs/") == 0
    await pull(proxy, images[0])
    assert upstream.count("GET", "/blobs/") >= 1
    stats = run_admin(object_store, "cache", "stats", "--storage", f"s3://{bucket}/cache", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["used_bytes"] == stored()


async def test_purge_and_gc_on_s3(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    tmp_path: Path,
) -> None:
    keep = seed_image(registry, "library/keep", "1", platforms=("linux/amd64",), single=True)
    drop = seed_image(registry, "library/drop", "1", platforms=("linux/amd64",), single=True)
    upstream = front(registry)
    bucket = object_store.bucket()
    work = tmp_path / "w"
    proxy = s3_proxy(proxy_factory, object_store, bucket, upstream.url, work)
    await pull(proxy, keep)
    await pull(proxy, drop)
    await stored(object_store, bucket, *keep.blobs, *drop.blobs)
    proxy.stop()
    storage = f"s3://{bucket}/cache"
    purged = run_admin(object_store, "cache", "purge", "drop:1", "--storage", storage, "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout)["tags"] == 1
    keys = object_store.keys(bucket, "cache/")
    assert all(blob_key(d) not in keys for d in drop.blobs)
    assert all(blob_key(d) in keys for d in keep.blobs)
    assert not list(Path.cwd().glob("regproxy-work"))  # admin commands leave no work dir behind
    # a dead replica's upload, recorded in its work dir, is aborted by gc on that work dir
    upload = object_store.client().create_multipart_upload(
        Bucket=bucket, Key=blob_key("sha256:" + "e" * 64)
    )
    dead = work / "tmp" / "deadbeef0000"
    dead.mkdir(parents=True)
    (dead / ".lock").touch()
    (dead / "eeee-1.upload").write_text(
        json.dumps({"key": "blobs/sha256/ee/" + "e" * 64, "upload_id": upload["UploadId"]})
    )
    (dead / "eeee-1").write_bytes(b"x" * 1000)
    assert object_store.uploads(bucket)
    collected = run_admin(
        object_store, "gc", "--storage", storage, "--work-dir", str(work), "--json"
    )
    assert collected.returncode == 0, collected.stderr
    assert json.loads(collected.stdout)["details"].get("temp") == 1
    assert object_store.uploads(bucket) == []
    assert not dead.exists()
    # the proxy serves what is left without asking upstream
    proxy.start()
    upstream.reset()
    await pull(proxy, keep)
    assert upstream.count() == 0
