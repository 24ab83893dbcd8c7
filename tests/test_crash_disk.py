"""Crashes and the disk (issue #6): kill -9 mid-download, a full disk, read-only or unreadable
storage.

The disk tests mount a small ``tmpfs`` as the proxy's storage directory (root is needed; the
README's test command runs as root) and unmount it at teardown. Unreadable files are made with
``chmod 000`` while the proxy runs as root *without* ``CAP_DAC_OVERRIDE``/``CAP_DAC_READ_SEARCH``
(``setpriv --bounding-set``), so permissions apply to it as to any other user.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness.front import Drip, FlipByte, Front, path_contains
from tests.harness.images import SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry
from tests.harness.tools import require_tool
from tests.test_faults import (
    MiB,
    Outcome,
    assert_failed_not_complete,
    blob_file,
    blob_get,
    eventually,
    manifest_file,
    request,
    requests_at_once,
    settled,
    sha256,
    stored_blobs_verify,
    temp_files,
)

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]

#: Root, but without the capabilities that bypass file permissions.
NO_DAC = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    sys.executable,
    "-m",
    "proxy",
]


def _need_root() -> None:
    if os.geteuid() != 0:
        message = "mounting a tmpfs needs root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


class Disk:
    """A tmpfs mounted at ``path`` (resizable, remountable read-only)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size
        self._frozen: list[Path] = []

    def mount(self) -> None:
        _need_root()
        require_tool("mount")
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )

    def remount(self, options: str) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True
        )

    def unmount(self) -> None:
        for directory in reversed(self._frozen):
            subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)

    def freeze(self, directory: Path) -> None:
        """Make ``directory`` read-only from now on, under a process that has files open in it.

        ``remount,ro`` refuses while files are open for writing (the proxy's lock file is), so
        a read-only bind mount of the directory goes over it: every later path lookup, hence
        every new write, meets ``EROFS``, as after an ``errors=remount-ro`` on a real disk.
        """
        subprocess.run(
            ["mount", "--bind", str(directory), str(directory)], check=True, capture_output=True
        )
        self._frozen.append(directory)
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(directory)], check=True, capture_output=True
        )

    def thaw(self, directory: Path) -> None:
        subprocess.run(["umount", "-l", str(directory)], check=True, capture_output=True)
        self._frozen.remove(directory)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> Path:
        """Write a filler file until only ``leave`` bytes (or nothing) remain free."""
        filler = self.path / "filler"
        with open(filler, "wb") as handle:
            block = b"\0" * (256 * 1024)
            try:
                while self.free() > leave:
                    handle.write(block[: max(4096, min(len(block), self.free() - leave))])
                    handle.flush()
            except OSError:
                pass
        return filler


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 20 MiB tmpfs at ``tmp_path/disk`` (unmounted at teardown)."""
    instance = Disk(tmp_path / "disk", "20m")
    instance.mount()
    try:
        yield instance
    finally:
        instance.unmount()


def proxy_on(
    proxy_factory: ProxyFactory, upstream: Front, disk: Disk, tmp_path: Path, **kwargs: object
) -> ProxyProcess:
    """A proxy whose storage is on ``disk`` and whose log is not."""
    return proxy_factory(
        upstream.url, storage=disk.path / "data", log_path=tmp_path / "proxy.log", **kwargs
    )


def storage_complaints(log: str) -> list[str]:
    words = ("storage", "space", "read-only", "erofs", "enospc", "eacces", "permission")
    return [
        line
        for line in log.splitlines()
        if (" ERROR " in line or " WARNING " in line) and any(w in line.lower() for w in words)
    ]


async def check_up(proxy: ProxyProcess) -> None:
    got = await request(f"{proxy.url}/v2/")
    assert got.status == 200, got
    assert proxy.running


# -- kill -9 ---------------------------------------------------------------------------------------


async def test_kill9_during_50_downloads_leaves_nothing_partial(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(
        registry,
        "library/crash",
        "1",
        platforms=("linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/386"),
        layer_sizes=(1 * MiB, 768 * 1024, 512 * 1024),
    )
    digests = sorted(image.blobs)
    upstream = front(registry)
    upstream.add_fault(path_contains("/blobs/", "GET"), Drip(300_000), times=10_000)
    proxy = proxy_factory(upstream.url)
    base = f"{proxy.url}/v2/library/crash/blobs"

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        clients = [
            asyncio.ensure_future(request(f"{base}/{digests[i % len(digests)]}", session=session))
            for i in range(50)
        ]
        old_tmp = proxy.storage / "tmp"
        assert await eventually(lambda: len(temp_files(proxy)) >= 8, within=10)
        await asyncio.sleep(1.0)  # configs (tiny) are committed by now; layers are mid-way
        old_instances = {p.name for p in old_tmp.iterdir()}
        partial = temp_files(proxy)
        proxy.kill9()
        results: list[Outcome] = await asyncio.gather(*clients)

    assert partial, "the crash was meant to happen mid-download"
    for digest, got in zip((digests[i % len(digests)] for i in range(50)), results, strict=True):
        data = image.blobs[digest]
        if got.status == 200 and not got.cut:
            assert got.body == data, got  # finished before the crash: whole and right
        else:
            assert got.body == data[: len(got.body)] and len(got.body) < len(data), got
    committed_before = stored_blobs_verify(proxy.storage)
    assert len(committed_before) < len(digests), "every download finished before the kill"
    assert any(p.exists() for p in partial), "partial temp files stay behind after kill -9"

    upstream.clear_faults()
    proxy.start()
    instances = [p for p in (proxy.storage / "tmp").iterdir()]
    assert len(instances) == 1 and instances[0].is_dir(), instances
    assert instances[0].name not in old_instances, "the dead process's temp dir was not removed"
    assert [p.name for p in instances[0].iterdir()] == [".lock"]
    assert "removed temp files left by a previous run" in proxy.logs()
    for digest, size in stored_blobs_verify(proxy.storage).items():
        assert size == len(image.blobs[digest])

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        again = await asyncio.gather(
            *(request(f"{base}/{digests[i % len(digests)]}", session=session) for i in range(50))
        )
    for digest, got in zip((digests[i % len(digests)] for i in range(50)), again, strict=True):
        assert (got.status, got.error) == (200, None), got
        assert sha256(got.body) == digest
    assert set(stored_blobs_verify(proxy.storage)) == set(digests)


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def huge(registry: Registry) -> SeededImage:
    """One image whose single layer (24 MiB) is bigger than the whole 20 MiB disk."""
    return seed_image(
        registry, "library/huge", "1", platforms=("linux/amd64",), layer_sizes=(24 * MiB,)
    )


def _layer(image: SeededImage) -> tuple[str, bytes, str]:
    (child,) = image.children.values()
    digest = child.layers[0]
    return digest, image.blobs[digest], child.config_digest


async def _readyz(proxy: ProxyProcess) -> int | None:
    got = await request(f"{proxy.url}/readyz")
    if got.status == 404:
        return None  # not there (yet)
    return got.status


async def test_blob_bigger_than_the_disk_fails_safely_and_recovers(
    registry: Registry,
    huge: SeededImage,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    disk: Disk,
    tmp_path: Path,
) -> None:
    """Whatever the client gets, it is never a complete wrong blob; nothing half-written is
    committed, the temp space is given back, the server stays up, and a larger disk works."""
    digest, data, config = _layer(huge)
    upstream = front(registry)
    proxy = proxy_on(proxy_factory, upstream, disk, tmp_path)
    base = f"{proxy.url}/v2/library/huge/blobs"
    assert (await request(f"{base}/{config}")).status == 200
    free_before = disk.free()

    results = await requests_at_once(f"{base}/{digest}", 3)
    for got in results:
        if got.status == 200 and not got.cut:
            assert got.body == data, got
        elif got.cut:
            assert got.body == data[: len(got.body)] and len(got.body) < len(data), got
        else:
            assert got.status == 503 and got.registry_error() == "UNAVAILABLE", got

    await check_up(proxy)
    assert not blob_file(proxy, digest).exists()
    assert await eventually(lambda: not temp_files(proxy)), temp_files(proxy)
    assert await eventually(lambda: disk.free() >= free_before - 64 * 1024), "temp space kept"
    assert storage_complaints(proxy.logs()), "the failed write is not in the log"
    hit = await request(f"{base}/{config}")
    assert hit.headers is not None and (hit.status, hit.headers["X-Cache"]) == (200, "HIT")

    # readyz (if there): unready while the disk is full, ready once space is back
    if await _readyz(proxy) is not None:
        filler = disk.fill()
        assert await _readyz(proxy) == 503
        filler.unlink()
        assert await _readyz(proxy) == 200

    disk.remount("size=64m")
    fresh = await request(f"{base}/{digest}")
    assert fresh.headers is not None, fresh
    assert (fresh.status, fresh.error, fresh.headers["X-Cache"]) == (200, None, "MISS"), fresh
    assert fresh.body == data
    assert stored_blobs_verify(proxy.storage)[digest] == len(data)


async def test_blob_bigger_than_the_disk_still_streams_to_clients(
    registry: Registry,
    huge: SeededImage,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    disk: Disk,
    tmp_path: Path,
) -> None:
    """The intended behaviour: a cache that cannot store a blob still relays it, verified."""
    digest, data, _ = _layer(huge)
    upstream = front(registry)
    proxy = proxy_on(proxy_factory, upstream, disk, tmp_path)
    url = f"{proxy.url}/v2/library/huge/blobs/{digest}"
    results = await requests_at_once(url, 3)
    for got in results:
        assert (got.status, got.error) == (200, None), got
        assert got.body == data
    assert not blob_file(proxy, digest).exists()
    await check_up(proxy)


async def test_wrong_bytes_relayed_uncached_never_complete(
    registry: Registry,
    huge: SeededImage,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    disk: Disk,
    tmp_path: Path,
) -> None:
    """The relay verifies too: when the rest of the blob (asked with Range once the disk is
    full) comes back wrong, every client is cut short of Content-Length."""
    digest, data, _ = _layer(huge)
    upstream = front(registry)
    upstream.add_fault(blob_get(digest, ranged=True), FlipByte(0), times=100)
    proxy = proxy_on(proxy_factory, upstream, disk, tmp_path)
    url = f"{proxy.url}/v2/library/huge/blobs/{digest}"
    results = await requests_at_once(url, 3)
    for got in results:
        assert_failed_not_complete(got)
        assert got.cut and len(got.body) < len(data), got
    assert upstream.count("GET", f"/blobs/{digest}", match=blob_get(digest, ranged=True)) >= 1
    assert not blob_file(proxy, digest).exists()
    await check_up(proxy)


async def test_manifest_on_a_full_disk_is_served_or_a_clear_error(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    disk: Disk,
    tmp_path: Path,
) -> None:
    image = seed_image(registry, "library/tiny", "1", platforms=("linux/amd64",))
    child = next(iter(image.children.values()))
    upstream = front(registry)
    proxy = proxy_on(proxy_factory, upstream, disk, tmp_path)
    base = f"{proxy.url}/v2/library/tiny"
    filler = disk.fill()
    assert disk.free() < 64 * 1024

    for path, want in (
        ("manifests/1", image.raw),
        (f"manifests/{child.digest}", child.raw),
        (f"blobs/{child.config_digest}", image.blobs[child.config_digest]),
    ):
        got = await request(f"{base}/{path}")
        if got.status == 200:
            assert (got.error, got.body) == (None, want), got
        else:
            assert not got.cut or got.body == want[: len(got.body)], got
            if not got.cut:
                assert got.status == 503 and got.registry_error() == "UNAVAILABLE", (path, got)
    await check_up(proxy)
    assert storage_complaints(proxy.logs())

    filler.unlink()
    checks: list[tuple[str, bytes | None]] = [
        ("manifests/1", image.raw),
        (f"blobs/{child.config_digest}", None),
    ]
    for path, expected in checks:
        got = await request(f"{base}/{path}")
        assert (got.status, got.error) == (200, None), got
        if expected is not None:
            assert got.body == expected
    settled(proxy.storage)
    assert manifest_file(proxy, image.digest).read_bytes() == image.raw
    assert blob_file(proxy, child.config_digest).exists()


# -- storage that turns read-only or unreadable --------------------------------------------------


@pytest.mark.parametrize(
    "what",
    [
        "tag",
        "manifest-digest",
        "blob-layer",
        "blob-config",
    ],
)
async def test_read_only_storage_is_an_error_not_a_miss(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    disk: Disk,
    tmp_path: Path,
    what: str,
) -> None:
    image = seed_image(registry, "library/ro", "1", layer_sizes=(64 * 1024,))
    amd, arm = image.child("linux/amd64"), image.child("linux/arm64/v8")
    upstream = front(registry)
    proxy = proxy_on(proxy_factory, upstream, disk, tmp_path, extra_args=["--tag-ttl", "0s"])
    base = f"{proxy.url}/v2/library/ro"
    for path in ("manifests/1", f"manifests/{amd.digest}", f"blobs/{amd.layers[0]}"):
        assert (await request(f"{base}/{path}")).status == 200

    disk.freeze(proxy.storage)
    # what is cached is still served
    got = await request(f"{base}/blobs/{amd.layers[0]}")
    assert (got.status, got.body) == (200, image.blobs[amd.layers[0]]), got
    got = await request(f"{base}/manifests/{amd.digest}")
    assert (got.status, got.body) == (200, amd.raw), got
    # what needs a write (a tag record, a manifest, a blob): the right bytes (relayed without
    # caching) or a 503 registry error, and a complaint in the log; never a 404, a 500, a
    # wrong body
    path, want = {
        "tag": ("manifests/1", image.raw),
        "manifest-digest": (f"manifests/{arm.digest}", arm.raw),
        "blob-layer": (f"blobs/{arm.layers[0]}", image.blobs[arm.layers[0]]),
        "blob-config": (f"blobs/{arm.config_digest}", image.blobs[arm.config_digest]),
    }[what]
    for method in ("GET", "HEAD"):
        got = await request(f"{base}/{path}", method)
        if got.status == 200:
            if method == "GET":
                assert (got.error, got.body) == (None, want), (path, got)
        else:
            assert got.status == 503, (path, method, got)
            if method == "GET":
                assert got.registry_error() == "UNAVAILABLE"
    await check_up(proxy)
    assert storage_complaints(proxy.logs()), proxy.logs()[-3000:]
    assert "Traceback" not in proxy.logs(), proxy.logs()[-3000:]
    if what.startswith("blob"):
        assert not blob_file(proxy, path.rpartition("/")[2]).exists()

    disk.thaw(proxy.storage)
    got = await request(f"{base}/{path}")
    assert (got.status, got.body) == (200, want), got
    assert stored_blobs_verify(proxy.storage)


@pytest.mark.parametrize(
    ("what", "when"),
    [
        ("blob-file", "while-running"),
        ("blob-shard", "while-running"),
        ("manifest-file", "while-running"),
        ("tag-record", "while-running"),
        ("blob-file", "at-start"),
        ("blob-shard", "at-start"),
        ("manifest-file", "at-start"),
        ("tag-record", "at-start"),
    ],
)
async def test_unreadable_storage_is_an_error_not_a_miss(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    what: str,
    when: str,
) -> None:
    """``chmod 000`` on a cached entry, under a running proxy or before a restart.

    A running proxy may answer from what it holds in memory (manifests, tags), with the right
    bytes; otherwise the answer is a 503 registry error and the log says why. Never a miss
    (no upstream GET), never a 404, 403 or 500.
    """
    _need_root()
    require_tool("setpriv")
    image = seed_image(registry, "library/locked", "1", platforms=("linux/amd64",), single=True)
    child = image.child("linux/amd64")
    layer = child.layers[0]
    upstream = front(registry)
    proxy = proxy_factory(upstream.url, base_command=NO_DAC)
    base = f"{proxy.url}/v2/library/locked"
    for path in ("manifests/1", f"blobs/{layer}"):
        assert (await request(f"{base}/{path}")).status == 200

    target, path, want = {
        "blob-file": (blob_file(proxy, layer), f"blobs/{layer}", image.blobs[layer]),
        "blob-shard": (blob_file(proxy, layer).parent, f"blobs/{layer}", image.blobs[layer]),
        "manifest-file": (
            manifest_file(proxy, image.digest),
            f"manifests/{image.digest}",
            image.raw,
        ),
        "tag-record": (
            proxy.storage / "repositories" / "docker.io" / "library" / "locked" / "_tags" / "1",
            "manifests/1",
            image.raw,
        ),
    }[what]
    settled(proxy.storage)
    assert target.exists()
    try:
        if when == "at-start":
            proxy.stop()
            target.chmod(0)
            proxy.start()
        else:
            target.chmod(0)
        upstream.reset()
        mark = len(proxy.logs())
        errors = 0
        for method in ("GET", "HEAD"):
            got = await request(f"{base}/{path}", method)
            if got.status == 200 and when == "while-running" and what.startswith(("man", "tag")):
                if method == "GET":
                    assert got.body == want, got  # from memory
                continue
            errors += 1
            assert got.status == 503, (method, got)
            if method == "GET":
                assert got.registry_error() == "UNAVAILABLE"
        if errors:
            assert storage_complaints(proxy.logs()[mark:]), proxy.logs()[-2000:]
        assert upstream.count("GET") == 0, "an unreadable cache entry was treated as a miss"
        await check_up(proxy)
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    got = await request(f"{base}/{path}")
    assert (got.status, got.body) == (200, want), got


def test_storage_helpers_are_sane(tmp_path: Path) -> None:
    """The verifier used above really catches a wrong blob (guards the guard)."""
    root = tmp_path / "s"
    data = b"hello"
    digest = sha256(data)
    path = root / "blobs" / "sha256" / digest[7:9] / digest[7:]
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert stored_blobs_verify(root) == {digest: 5}
    path.write_bytes(b"hellO")
    with pytest.raises(AssertionError):
        stored_blobs_verify(root)
    shutil.rmtree(root)
