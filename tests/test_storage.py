"""The storage contract, one suite run against every driver: the filesystem and S3, the latter on
two real servers (SeaweedFS and Ceph's RADOS Gateway: ``object_store`` in ``tests/conftest.py``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from storage import (
    CacheSettings,
    ContentStore,
    DigestMismatch,
    MetadataStore,
    S3Settings,
    StorageError,
    TagEntry,
    WorkSettings,
    create_store,
)
from storage import s3 as s3_module
from storage import writer as writer_module
from storage.eviction import CacheManager
from storage.redis import RedisCoordinator, RedisMetadata, connect
from storage.writer import SpoolWriter
from tests.harness.redis import RedisServer
from tests.harness.s3store import S3Store

MiB = 1024 * 1024
GiB = 1024 * MiB


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def s3_settings(server: S3Store, bucket: str, **kwargs: object) -> S3Settings:
    env = server.env()
    return S3Settings(
        bucket=bucket,
        prefix="cache",
        endpoint=server.endpoint,
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["filesystem", "seaweedfs", "rgw"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ContentStore]:
    s3 = None
    if request.param != "filesystem":
        server: S3Store = request.getfixturevalue(
            "seaweed" if request.param == "seaweedfs" else "rgw"
        )
        server.start()
        # a small part size would be refused by S3; 5 MiB keeps the multipart tests quick
        s3 = s3_settings(server, server.bucket(), part_size=5 * 1024 * 1024)
    backend = create_store(tmp_path / "root", s3, WorkSettings(tmp_path / "work", 64 * 1024**2))
    await backend.open()
    yield backend
    await backend.close()
    tmp = tmp_path / ("work" if s3 else "root") / "tmp"
    leftovers = list(tmp.iterdir())
    assert leftovers == [], f"temp files left behind: {leftovers}"
    if s3 is not None:
        assert server.uploads(s3.bucket) == [], "multipart uploads left behind"


async def read_all(
    store: ContentStore, dgst: str, offset: int = 0, length: int | None = None
) -> bytes:
    stream = await store.read_blob(dgst, offset, length)
    assert stream is not None
    return b"".join([chunk async for chunk in stream])


@pytest.mark.parametrize("size", [100_000, 12 * 1024 * 1024 + 3])  # one PUT; three parts
async def test_blob_invisible_until_commit(store: ContentStore, size: int) -> None:
    data = os.urandom(size)
    writer = store.blob_writer(digest(data))
    await writer.write(data[: size // 2])
    assert await store.stat_blob(digest(data)) is None
    await writer.write(data[size // 2 :])
    assert writer.path.read_bytes() == data  # followers read the spool as it grows
    assert await store.stat_blob(digest(data)) is None
    await writer.commit(digest(data), len(data))
    assert await store.stat_blob(digest(data)) == len(data)
    local = store.local_blob(digest(data))
    assert local is not None and local.path.read_bytes() == data
    assert await read_all(store, digest(data)) == data
    assert await read_all(store, digest(data), 1000, 5000) == data[1000:6000]


async def test_tier_fill_and_remote_read(store: ContentStore, tmp_path: Path) -> None:
    """On S3 a blob leaves the local tier and is read back from the bucket, then refilled."""
    data = os.urandom(300_000)
    writer = store.blob_writer(digest(data))
    await writer.write(data)
    await writer.commit(digest(data))
    if store.name != "s3":
        assert store.tier_writer(digest(data)) is None  # every blob is local already
        return
    local = store.local_blob(digest(data))
    assert local is not None
    local.path.unlink()
    store.driver.tier.scan()  # type: ignore[attr-defined]
    assert store.local_blob(digest(data)) is None
    assert await store.stat_blob(digest(data)) == len(data)
    assert await read_all(store, digest(data), 10, 20) == data[10:30]
    filler = store.tier_writer(digest(data))
    assert filler is not None
    await filler.write(await read_all(store, digest(data)))
    await filler.commit(digest(data), len(data))
    local = store.local_blob(digest(data))
    assert local is not None and local.path.read_bytes() == data


@pytest.mark.parametrize("bad", ["digest", "size"])
@pytest.mark.parametrize("size", [4096, 11 * 1024 * 1024])
async def test_wrong_blob_never_committed(store: ContentStore, bad: str, size: int) -> None:
    data = os.urandom(size)
    expected = digest(b"something else") if bad == "digest" else digest(data)
    length = len(data) + 1 if bad == "size" else len(data)
    writer = store.blob_writer(expected)
    await writer.write(data)
    with pytest.raises(DigestMismatch):
        await writer.commit(expected, length)
    assert await store.stat_blob(expected) is None
    assert await store.read_blob(expected) is None
    assert not writer.path.exists()


async def test_cancel_removes_temp(store: ContentStore) -> None:
    writer = store.blob_writer(digest(b"x"))
    await writer.write(b"x")
    await writer.cancel()
    await writer.cancel()  # twice is fine
    assert not writer.path.exists()
    assert await store.stat_blob(digest(b"x")) is None


async def test_delete_blob(store: ContentStore) -> None:
    data = b"hello"
    writer = store.blob_writer(digest(data))
    await writer.write(data)
    await writer.commit(digest(data))
    assert await store.delete_blob(digest(data))
    assert not await store.delete_blob(digest(data))
    assert await store.stat_blob(digest(data)) is None
    assert store.local_blob(digest(data)) is None


async def test_listing_for_eviction(store: ContentStore) -> None:
    blob, manifest = os.urandom(1000), b'{"schemaVersion":2}'
    writer = store.blob_writer(digest(blob))
    await writer.write(blob)
    await writer.commit(digest(blob))
    await store.put_manifest(digest(manifest), manifest, "application/json")
    await store.set_tag("docker.io", "library/a", "1", TagEntry(digest(manifest), "x", 1, 1.0))
    listed = {(c.kind, c.digest, c.size) for c in await store.list_content()}
    assert listed == {("blob", digest(blob), 1000), ("manifest", digest(manifest), len(manifest))}
    tags = [(t.upstream, t.repository, t.tag) for t in await store.list_tags()]
    assert tags == [("docker.io", "library/a", "1")]


async def test_manifests_round_trip_with_media_type(store: ContentStore) -> None:
    data = b'{"schemaVersion":2}'
    await store.put_manifest(digest(data), data, "application/vnd.oci.image.manifest.v1+json")
    assert await store.get_manifest(digest(data)) == (
        data,
        "application/vnd.oci.image.manifest.v1+json",
    )
    store.forget(digest(data))  # from the backend, not memory
    assert await store.get_manifest(digest(data)) == (
        data,
        "application/vnd.oci.image.manifest.v1+json",
    )
    with pytest.raises(DigestMismatch):
        await store.put_manifest(digest(b"other"), data, "x")
    assert await store.delete_manifest(digest(data))
    assert await store.get_manifest(digest(data)) is None


async def test_s3_listings_go_page_by_page(
    object_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys and abandoned multipart uploads are found past the first page of a listing, on both
    stores: RGW names the next page's markers, SeaweedFS does not (its listing starts over after
    the aborts, see ``S3Driver._abort_abandoned``)."""
    monkeypatch.setattr(s3_module, "LIST_PAGE", 2)
    monkeypatch.setattr(s3_module, "ABANDONED_AFTER", -3600.0)  # every upload is abandoned
    bucket = object_store.bucket()
    client = object_store.client()
    for i in range(5):
        object_store.put_object(bucket, f"cache/blobs/sha256/0{i}/k{i}", b"x" * (i + 1))
    began = [f"cache/blobs/sha256/ab/u{i % 4}" for i in range(7)]  # one key twice
    for key in [*began, "elsewhere/u"]:
        client.create_multipart_upload(Bucket=bucket, Key=key)
    store = create_store(
        tmp_path / "root", s3_settings(object_store, bucket), WorkSettings(tmp_path / "work")
    )
    await store.open()
    try:
        driver = store.driver
        assert isinstance(driver, s3_module.S3Driver)
        walked = {(o.key, o.size) async for o in driver.walk("blobs/")}
        assert walked == {(f"blobs/sha256/0{i}/k{i}", i + 1) for i in range(5)}
    finally:
        await store.close()
    assert object_store.uploads(bucket, "cache/") == []
    assert [u["Key"] for u in object_store.uploads(bucket)] == ["elsewhere/u"]


@pytest.fixture(params=["filesystem", "redis"])
async def meta(
    request: pytest.FixtureRequest, store: ContentStore, tmp_path: Path
) -> AsyncIterator[MetadataStore]:
    """The metadata suite runs on the filesystem store and on Redis (written through)."""
    if request.param == "filesystem":
        yield store
        return
    server = RedisServer(tmp_path / "redis").start()
    client = connect(server.url)
    try:
        yield RedisMetadata(client, store)
    finally:
        await client.aclose()
        server.stop()


async def test_tags_are_namespaced_per_upstream(meta: MetadataStore) -> None:
    entry = TagEntry("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", 10, 1.5)
    await meta.set_tag("docker.io", "library/alpine", "3", entry)
    assert await meta.get_tag("docker.io", "library/alpine", "3") == entry
    assert await meta.get_tag("ghcr.io", "library/alpine", "3") is None
    assert await meta.get_tag("docker.io", "library/alpine", "4") is None
    await meta.delete_tag("docker.io", "library/alpine", "3")
    assert await meta.get_tag("docker.io", "library/alpine", "3") is None


async def test_records_round_trip(meta: MetadataStore) -> None:
    assert await meta.get_record("docker.io", "a/b", "sources", "sha256:x") is None
    await meta.set_record("docker.io", "a/b", "sources", "sha256:x", b'{"v": 1}')
    await meta.set_record("docker.io", "a/b", "sources", "sha256:x", b'{"v": 2}')
    assert await meta.get_record("docker.io", "a/b", "sources", "sha256:x") == b'{"v": 2}'
    assert await meta.get_record("ghcr.io", "a/b", "sources", "sha256:x") is None


async def test_redis_going_away_degrades_to_disk(store: ContentStore, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    client = connect(server.url)
    meta = RedisMetadata(client, store)
    entry = TagEntry("sha256:" + "c" * 64, "application/vnd.oci.image.manifest.v1+json", 5, 2.0)
    await meta.set_tag("docker.io", "library/x", "1", entry)
    server.stop()
    try:
        assert await meta.get_tag("docker.io", "library/x", "1") == entry  # from disk
        await meta.set_tag("docker.io", "library/x", "2", entry)  # no exception
        assert await meta.get_tag("docker.io", "library/x", "2") == entry
        assert meta.guard.failures >= 2
    finally:
        await client.aclose()


async def test_unreadable_storage_is_an_error_not_a_miss(tmp_path: Path) -> None:
    """A broken disk is an error, never a miss (the object store's failures: tests/test_s3.py)."""
    root = tmp_path / "root"
    store = create_store(root, None, WorkSettings())
    await store.open()
    # root reads through permissions; make the path itself unusable instead
    blob_dir = root / "blobs" / "sha256" / "bb"
    blob_dir.parent.mkdir(parents=True, exist_ok=True)
    blob_dir.write_bytes(b"not a directory")
    with pytest.raises(StorageError):
        await store.stat_blob("sha256:" + "b" * 64)
    await store.close()


async def test_temp_files_of_dead_process_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "root"
    script = (
        "import asyncio, os\n"
        "from pathlib import Path\n"
        "from storage import FilesystemDriver, ContentStore\n"
        f"s = ContentStore(FilesystemDriver(Path({str(root)!r})))\n"
        "async def main():\n"
        "    await s.open()\n"
        "    w = s.blob_writer('sha256:' + 'c' * 64); await w.write(b'partial')\n"
        "    os._exit(0)  # like a crash: no cleanup\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert any(p.name != ".lock" for p in (root / "tmp").rglob("*") if p.is_file())
    live = create_store(root, None, WorkSettings())
    await live.open()
    assert len(live.driver.leftovers) == 1
    tmp_dir = live.driver.tmp_dir  # type: ignore[attr-defined]
    assert [p for p in (root / "tmp").iterdir()] == [tmp_dir]
    # a second live process does not remove the first one's directory
    other = create_store(root, None, WorkSettings())
    await other.open()
    assert tmp_dir.exists()
    await other.close()
    await live.close()


def require_fallocate(directory: Path) -> None:
    """Skip unless fallocate(2) reserves blocks in ``directory`` (fail under ``CI=true``):
    without it, a test of reserved blocks would check nothing."""
    problem = None
    if writer_module._fallocate is None:
        problem = "fallocate(2) is not available on this platform"
    else:
        probe = directory / ".fallocate-probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if writer_module._fallocate(fd, writer_module._FALLOC_FL_KEEP_SIZE, 0, MiB) != 0:
                problem = f"fallocate(2) fails on {directory}"
            elif os.fstat(fd).st_blocks * 512 < MiB:
                problem = f"fallocate(2) reserves no blocks on {directory}"
        finally:
            os.close(fd)
            probe.unlink()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)


async def test_spool_reserves_blocks_only_a_window_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream announcing a huge Content-Length cannot hold the disk: blocks are reserved
    at most RESERVE_AHEAD beyond the bytes that came (and the file's size is what came)."""
    require_fallocate(tmp_path)
    monkeypatch.setattr(writer_module, "RESERVE_AHEAD", 4 * MiB)
    spool = SpoolWriter(tmp_path, "blobs/sha256/ab/abcdef", "sha256")

    def held() -> int:
        return os.stat(spool.path).st_blocks * 512

    slack = MiB  # the filesystem's own metadata blocks
    try:
        spool.reserve(64 * GiB)  # announced; far more than will come
        assert 4 * MiB <= held() <= 4 * MiB + slack, held()  # a window, not 64 GiB
        chunk = os.urandom(MiB)
        for n in range(1, 11):
            spool.append([chunk])
            # ahead of the bytes by at least half a window, at most a whole one
            assert n * MiB + 2 * MiB <= held() <= n * MiB + 4 * MiB + slack, (n, held())
            assert os.stat(spool.path).st_size == n * MiB
    finally:
        await spool.cancel()  # a failure must not leave the blocks held
    assert not spool.path.exists()


async def test_eviction_pages_through_shared_access_times_and_drops_gone_digests(
    tmp_path: Path,
) -> None:
    """``regproxy:access`` gets a member for every digest a fleet serves. An eviction pass reads
    it a bounded page at a time (never all of it at once), removes the members of what it
    evicts and of content long gone from the store, and still orders by the shared times."""
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    client = connect(server.url)
    store = create_store(tmp_path / "root", None, WorkSettings())
    await store.open()
    try:
        now = time.time()
        blobs = [os.urandom(1000) for _ in range(20)]
        for data in blobs:
            writer = store.blob_writer(digest(data))
            await writer.write(data)
            await writer.commit(digest(data))
            local = store.local_blob(digest(data))
            assert local is not None
            os.utime(local.path, (now - 200 * 86400, now - 200 * 86400))
        # last use by the fleet: an order unlike the write order, older than every leftover
        order = [blobs[(i * 7) % 20] for i in range(20)]  # order[0] used longest ago
        used_at = {digest(b): now - 100 * 86400 + i * 3600 for i, b in enumerate(order)}
        leftovers = {f"sha256:{i:064x}": now - 86400 - i for i in range(3000)}  # gone long ago
        unlisted = {f"sha256:{'f' * 60}{i:04x}": now - 5 for i in range(10)}  # may lag a listing
        admin.zadd("regproxy:access", {**used_at, **leftovers, **unlisted})
        admin.config_set("slowlog-log-slower-than", 0)
        admin.config_set("slowlog-max-len", 100_000)
        admin.slowlog_reset()

        cache = CacheManager(store, CacheSettings(max_size=20_000), interval=3600)
        cache.coordinator = RedisCoordinator(client, store.instance)
        cache.coordinator.page = 100
        await cache.evict()

        # down to 85% of 20 kB: the three the fleet used longest ago, by the shared times
        evicted = {digest(b) for b in blobs if await store.stat_blob(digest(b)) is None}
        assert evicted == {digest(b) for b in order[:3]}
        logged = [entry["command"].decode().split() for entry in admin.slowlog_get(100_000)]
        ranges = [c for c in logged if c[0].upper() in ("ZRANGE", "ZREVRANGE")]
        assert len(ranges) >= 3030 // 100, ranges  # it went through the whole set, page by page
        for command in ranges:
            start, stop = int(command[2]), int(command[3])
            assert 0 <= start <= stop and stop - start + 1 <= 100, command
        left = {m.decode() for m in admin.zrange("regproxy:access", 0, -1)}
        assert left == {digest(b) for b in order[3:]} | set(unlisted)
    finally:
        await store.close()
        await client.aclose()
        admin.close()
        server.stop()


async def test_a_tag_redis_lacks_comes_from_the_store_record_not_memory(tmp_path: Path) -> None:
    """Redis restarted empty: the tag comes from the store's record and goes back into Redis.
    The record removed by another process (``regproxy cache purge``): no tag, although this
    process set it and still remembers it."""
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    client = connect(server.url)
    store = create_store(tmp_path / "root", None, WorkSettings())
    await store.open()
    try:
        meta = RedisMetadata(client, store)
        entry = TagEntry("sha256:" + "d" * 64, "application/vnd.oci.image.index.v1+json", 7, 3.0)
        await meta.set_tag("docker.io", "library/x", "1", entry)
        admin.flushall()
        assert await meta.get_tag("docker.io", "library/x", "1") == entry
        assert admin.exists("regproxy:tag:docker.io:library/x:1")

        admin.flushall()
        other = create_store(tmp_path / "root", None, WorkSettings())  # the purging process
        await other.open()
        await other.delete_tag("docker.io", "library/x", "1")
        await other.close()
        assert await meta.get_tag("docker.io", "library/x", "1") is None
        assert not admin.exists("regproxy:tag:docker.io:library/x:1")
    finally:
        await store.close()
        await client.aclose()
        admin.close()
        server.stop()
