"""The storage contract, run against every backend (today: the filesystem)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.errors import StorageError, UpstreamContentError
from storage import FilesystemStorage, MetadataStore, TagEntry
from storage.redis import RedisMetadata, connect
from tests.harness.redis import RedisServer


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["filesystem"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FilesystemStorage]:
    backend = FilesystemStorage(tmp_path / "root")
    backend.open()
    yield backend
    backend.close()
    leftovers = list((tmp_path / "root" / "tmp").iterdir())
    assert leftovers == [], f"temp files left behind: {leftovers}"


async def test_blob_invisible_until_commit(store: FilesystemStorage) -> None:
    data = os.urandom(100_000)
    writer = store.blob_writer(digest(data))
    writer.write(data[:50_000])
    assert await store.stat_blob(digest(data)) is None
    writer.write(data[50_000:])
    assert await store.stat_blob(digest(data)) is None
    await writer.commit(digest(data), len(data))
    assert await store.stat_blob(digest(data)) == len(data)
    assert store.blob_path(digest(data)).read_bytes() == data


@pytest.mark.parametrize("bad", ["digest", "size"])
async def test_wrong_blob_never_committed(store: FilesystemStorage, bad: str) -> None:
    data = os.urandom(4096)
    expected = digest(b"something else") if bad == "digest" else digest(data)
    size = len(data) + 1 if bad == "size" else len(data)
    writer = store.blob_writer(expected)
    writer.write(data)
    with pytest.raises(UpstreamContentError):
        await writer.commit(expected, size)
    assert await store.stat_blob(expected) is None
    assert not writer.path.exists()


async def test_cancel_removes_temp(store: FilesystemStorage) -> None:
    writer = store.blob_writer(digest(b"x"))
    writer.write(b"x")
    await writer.cancel()
    await writer.cancel()  # twice is fine
    assert not writer.path.exists()
    assert await store.stat_blob(digest(b"x")) is None


async def test_delete_blob(store: FilesystemStorage) -> None:
    data = b"hello"
    writer = store.blob_writer(digest(data))
    writer.write(data)
    await writer.commit(digest(data))
    assert await store.delete_blob(digest(data))
    assert not await store.delete_blob(digest(data))
    assert await store.stat_blob(digest(data)) is None


async def test_manifests_round_trip_with_media_type(store: FilesystemStorage) -> None:
    data = b'{"schemaVersion":2}'
    await store.put_manifest(digest(data), data, "application/vnd.oci.image.manifest.v1+json")
    assert await store.get_manifest(digest(data)) == (
        data,
        "application/vnd.oci.image.manifest.v1+json",
    )
    with pytest.raises(UpstreamContentError):
        await store.put_manifest(digest(b"other"), data, "x")
    assert await store.delete_manifest(digest(data))
    assert await store.get_manifest(digest(data)) is None


@pytest.fixture(params=["filesystem", "redis"])
async def meta(
    request: pytest.FixtureRequest, store: FilesystemStorage, tmp_path: Path
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


async def test_redis_going_away_degrades_to_disk(store: FilesystemStorage, tmp_path: Path) -> None:
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


async def test_unreadable_storage_is_an_error_not_a_miss(
    store: FilesystemStorage, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        # root reads through permissions; make the path itself unusable instead
        blob_dir = store.blob_path("sha256:" + "b" * 64).parent
        blob_dir.parent.mkdir(parents=True, exist_ok=True)
        blob_dir.write_bytes(b"not a directory")
    else:
        (store.root / "blobs").chmod(0)
    with pytest.raises(StorageError):
        await store.stat_blob("sha256:" + "b" * 64)


def test_temp_files_of_dead_process_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "root"
    script = (
        "import os, sys\n"
        "from storage import FilesystemStorage\n"
        f"s = FilesystemStorage({str(root)!r}); s.open()\n"
        "w = s.blob_writer('sha256:' + 'c' * 64); w.write(b'partial')\n"
        "os._exit(0)  # like a crash: no cleanup\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert any(p.name != ".lock" for p in (root / "tmp").rglob("*") if p.is_file())
    live = FilesystemStorage(root)
    assert live.open() == 1
    assert [p for p in (root / "tmp").iterdir()] == [live.tmp_dir]
    # a second live process does not remove the first one's directory
    other = FilesystemStorage(root)
    other.open()
    assert live.tmp_dir.exists()
    other.close()
    live.close()
