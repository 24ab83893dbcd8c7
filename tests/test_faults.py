"""Faults from the upstream (issue #6): cut, corrupted, failing, rate-limiting, redirecting.

Everything runs against the real proxy subprocess and a real ``docker-registry``, with a
fault-injecting ``Front`` in between. ``test_read_path`` already covers a single cut, a single
corrupted download and a 429 with nothing cached; this module adds repeated cuts, concurrent
clients on one broken download, resumes that cannot work, 5xx/refused with and without a cached
tag, an upstream that stops talking (read timeout), the 429 back-off with a cache, and
redirects to a CDN under Bearer auth.

The helpers at the top are shared by the other issue-#6 modules (``test_hostile``,
``test_crash_disk``, ``test_soak``).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from tests.harness.front import (
    CutAfter,
    Drip,
    FlipByte,
    Front,
    Match,
    RedirectTo,
    Req,
    Stall,
    Status,
    WrongLength,
    any_request,
    path_contains,
    too_many_requests,
)
from tests.harness.images import MANIFEST_TYPES, SeededImage, SeededRegistry, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import start_registry

ACCEPT = ", ".join(MANIFEST_TYPES)
ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
MiB = 1024 * 1024

#: What a client sees when the proxy cuts its connection short of Content-Length.
CUT_OFF = (
    aiohttp.ClientPayloadError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)


# -- shared helpers ------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Outcome:
    """One client request: the answer, or how the connection broke (``status`` None)."""

    status: int | None
    headers: CIMultiDictProxy[str] | None
    body: bytes
    error: str | None = None

    @property
    def cut(self) -> bool:
        return self.status is None or self.error is not None

    def registry_error(self) -> str:
        """The code of a registry error envelope; fails the test if the body is not one."""
        assert self.headers is not None
        assert self.headers.get("Content-Type", "").startswith("application/json"), self
        doc = json.loads(self.body)
        assert isinstance(doc["errors"], list) and doc["errors"], doc
        entry = doc["errors"][0]
        assert isinstance(entry["code"], str) and isinstance(entry["message"], str), doc
        return str(entry["code"])

    def __repr__(self) -> str:
        cache = self.headers.get("X-Cache") if self.headers else None
        return (
            f"Outcome(status={self.status}, cache={cache}, len={len(self.body)}, "
            f"error={self.error}, body={self.body[:200]!r})"
        )


async def request(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
    within: float = 60,
) -> Outcome:
    """Send one request (raw path kept as written); a broken body is an Outcome, not a raise."""
    hdrs = {"Accept": ACCEPT, **(headers or {})}
    own = session is None
    sess = session or aiohttp.ClientSession(auto_decompress=False)
    status: int | None = None
    resp_headers: CIMultiDictProxy[str] | None = None
    body = b""
    try:
        async with sess.request(
            method,
            URL(url, encoded=True),
            headers=hdrs,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as resp:
            status, resp_headers = resp.status, resp.headers
            chunks = []
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
            body = b"".join(chunks)
    except CUT_OFF as exc:
        return Outcome(status, resp_headers, body, type(exc).__name__)
    finally:
        if own:
            await sess.close()
    return Outcome(status, resp_headers, body)


async def requests_at_once(url: str, clients: int) -> list[Outcome]:
    """``clients`` GETs of ``url`` at the same time, on one session (a connection each)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        return await asyncio.gather(*(request(url, session=session) for _ in range(clients)))


def blob_file(proxy: ProxyProcess, digest: str) -> Path:
    algorithm, _, hexpart = digest.partition(":")
    return proxy.storage / "blobs" / algorithm / hexpart[:2] / hexpart


def manifest_file(proxy: ProxyProcess, digest: str) -> Path:
    algorithm, _, hexpart = digest.partition(":")
    return proxy.storage / "manifests" / algorithm / hexpart[:2] / hexpart


def temp_files(proxy: ProxyProcess) -> list[Path]:
    """Files in ``storage/tmp/*/`` other than the per-process ``.lock``."""
    return _spools(proxy.storage)


def settled(storage: Path, within: float = 5.0) -> None:
    """Wait until no download spools in ``storage`` (each was published or dropped)."""
    deadline = time.monotonic() + within
    while _spools(storage) and time.monotonic() < deadline:
        time.sleep(0.02)


def _spools(storage: Path) -> list[Path]:
    tmp = storage / "tmp"
    if not tmp.exists():
        return []
    return [p for p in tmp.glob("*/*") if p.name != ".lock"] + [
        p for p in tmp.glob("*") if p.is_file()
    ]


def stored_blobs_verify(storage: Path, settle: float = 5.0) -> dict[str, int]:
    """Check every file under ``storage/blobs``: its sha256 is its name. Returns digest -> size.

    A client has its last byte once the blob is verified, a moment before the spool is fsynced
    and renamed into ``blobs/``: first wait (up to ``settle`` s) until no spool is left.
    """
    settled(storage, settle)
    found: dict[str, int] = {}
    for path in (storage / "blobs").rglob("*"):
        if path.is_dir():
            continue
        algorithm = path.parent.parent.name
        data = path.read_bytes()
        actual = hashlib.new(algorithm, data).hexdigest()
        assert actual == path.name, f"stored blob {path} holds {algorithm}:{actual}"
        assert path.parent.name == path.name[:2], f"blob in the wrong shard: {path}"
        found[f"{algorithm}:{path.name}"] = len(data)
    return found


async def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


def blob_get(digest: str, *, ranged: bool | None = None) -> Match:
    """GETs of ``.../blobs/<digest>``; ``ranged`` True/False: only with/without ``Range``."""

    def match(req: Req) -> bool:
        return (
            req.method == "GET"
            and req.path.endswith(f"/blobs/{digest}")
            and (ranged is None or ("Range" in req.headers) == ranged)
        )

    return match


def assert_failed_not_complete(outcome: Outcome, good: bytes | None = None) -> None:
    """The client knows it failed: cut short, or a registry error; never 200 + whole wrong body."""
    if outcome.cut:
        if outcome.headers is not None and "Content-Length" in outcome.headers:
            assert len(outcome.body) < int(outcome.headers["Content-Length"]), outcome
        return
    assert outcome.status != 200 or (good is not None and outcome.body == good), outcome
    assert outcome.status is not None and outcome.status >= 400, outcome
    outcome.registry_error()


# -- fixtures ------------------------------------------------------------------------------------


@dataclass
class BigImages:
    registry: Any
    images: dict[str, SeededImage]

    def layer(self, ref: str) -> tuple[str, bytes]:
        image = self.images[ref]
        (child,) = image.children.values()
        digest = child.layers[0]
        return digest, image.blobs[digest]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigImages]:
    """A module-wide registry with one 8 MiB and one 2 MiB single-layer image (read-only)."""
    reg = start_registry(tmp_path_factory.mktemp("faults-registry"))
    try:
        images = {
            "library/big:1": seed_image(
                reg, "library/big", "1", platforms=("linux/amd64",), layer_sizes=(8 * MiB,)
            ),
            "library/mid:1": seed_image(
                reg, "library/mid", "1", platforms=("linux/amd64",), layer_sizes=(2 * MiB,)
            ),
        }
        yield BigImages(reg, images)
    finally:
        reg.stop()


@pytest.fixture
def upstream(seeded_registry: SeededRegistry, front: FrontFactory) -> Front:
    return front(seeded_registry.registry)


# -- cut mid-blob --------------------------------------------------------------------------------


async def test_blob_cut_several_times_is_resumed_from_the_last_byte(
    big: BigImages, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    digest, data = big.layer("library/big:1")
    upstream = front(big.registry)
    upstream.add_fault(blob_get(digest, ranged=False), CutAfter(1_000_000))
    upstream.add_fault(blob_get(digest, ranged=True), CutAfter(1_500_000), times=3)
    proxy = proxy_factory(upstream.url)
    url = f"{proxy.url}/v2/library/big/blobs/{digest}"

    got = await request(url)
    assert (got.status, got.error) == (200, None), got
    assert len(got.body) == len(data) and sha256(got.body) == digest
    ranges = [r.headers["Range"] for r in upstream.requests if blob_get(digest, ranged=True)(r)]
    assert ranges == ["bytes=1000000-", "bytes=2500000-", "bytes=4000000-", "bytes=5500000-"]
    assert upstream.count("GET", f"/blobs/{digest}") == 5
    settled(proxy.storage)
    assert blob_file(proxy, digest).read_bytes() == data
    again = await request(url)
    assert (again.status, again.headers and again.headers["X-Cache"]) == (200, "HIT")
    assert again.body == data


async def test_concurrent_clients_share_one_repeatedly_cut_download(
    big: BigImages, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    digest, data = big.layer("library/big:1")
    upstream = front(big.registry)
    upstream.add_fault(blob_get(digest, ranged=False), CutAfter(500_000))
    upstream.add_fault(blob_get(digest, ranged=True), CutAfter(2_500_000), times=2)
    # The last resume is slow (~2.5 s), so late clients join a download that was cut twice.
    upstream.add_fault(blob_get(digest, ranged=True), Drip(3 * MiB))
    proxy = proxy_factory(upstream.url)
    url = f"{proxy.url}/v2/library/big/blobs/{digest}"

    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def late(delay: float, headers: dict[str, str] | None = None) -> Outcome:
            await asyncio.sleep(delay)
            return await request(url, headers=headers, session=session)

        tasks = [late(0) for _ in range(10)]
        tasks += [late(0.3) for _ in range(5)]
        tasks += [late(1.0) for _ in range(5)]
        tasks += [late(0.5, {"Range": "bytes=6000000-6000999"})]
        results = await asyncio.gather(*tasks)

    for got in results[:-1]:
        assert (got.status, got.error) == (200, None), got
        assert sha256(got.body) == digest, got
    ranged = results[-1]
    assert (ranged.status, ranged.body) == (206, data[6_000_000:6_001_000]), ranged
    assert upstream.count("GET", f"/blobs/{digest}") == 4  # one download, three resumes
    ranges = [r.headers["Range"] for r in upstream.requests if blob_get(digest, ranged=True)(r)]
    assert ranges == ["bytes=500000-", "bytes=3000000-", "bytes=5500000-"]
    assert stored_blobs_verify(proxy.storage) == {digest: len(data)}


async def test_resume_answered_with_the_whole_blob_skips_what_it_has(
    big: BigImages, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    """An upstream that ignores ``Range`` (200 + the whole body): the proxy skips the prefix."""
    digest, data = big.layer("library/mid:1")
    upstream = front(big.registry)
    upstream.add_fault(blob_get(digest, ranged=False), CutAfter(300_000))
    upstream.add_fault(
        blob_get(digest, ranged=True),
        Status(200, {"Content-Type": "application/octet-stream"}, data),
    )
    proxy = proxy_factory(upstream.url)
    got = await request(f"{proxy.url}/v2/library/mid/blobs/{digest}")
    assert (got.status, got.error) == (200, None), got
    assert got.body == data
    assert stored_blobs_verify(proxy.storage) == {digest: len(data)}


def _flip_all(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


RESUME_IMPOSSIBLE: dict[str, Callable[[bytes, int], Status | CutAfter]] = {
    # every reconnect is cut before its first byte: no progress, the proxy must give up
    "no-progress": lambda data, off: CutAfter(0),
    "416": lambda data, off: Status(416, {"Content-Range": f"bytes */{len(data)}"}),
    "206-wrong-offset": lambda data, off: Status(
        206,
        {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}",
        },
        data,
    ),
    "200-size-changed": lambda data, off: Status(
        200, {"Content-Type": "application/octet-stream"}, data + b"trailing"
    ),
    "206-other-bytes": lambda data, off: Status(
        206,
        {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {off}-{len(data) - 1}/{len(data)}",
        },
        _flip_all(data[off:]),
    ),
    "503": lambda data, off: Status(503),
}


@pytest.mark.parametrize("mode", sorted(RESUME_IMPOSSIBLE))
async def test_resume_impossible_fails_the_client_and_caches_nothing(
    big: BigImages, front: FrontFactory, proxy_factory: ProxyFactory, mode: str
) -> None:
    digest, data = big.layer("library/mid:1")
    cut_at = 250_000
    upstream = front(big.registry)
    upstream.add_fault(blob_get(digest, ranged=False), CutAfter(cut_at))
    upstream.add_fault(
        blob_get(digest, ranged=True), RESUME_IMPOSSIBLE[mode](data, cut_at), times=100
    )
    proxy = proxy_factory(upstream.url)
    url = f"{proxy.url}/v2/library/mid/blobs/{digest}"

    got = await request(url)
    # headers and the first bytes were out before the cut: the connection must be cut short
    assert got.cut, got
    assert got.body == data[: len(got.body)]
    assert len(got.body) < len(data)
    assert not blob_file(proxy, digest).exists()
    assert await eventually(lambda: not temp_files(proxy)), temp_files(proxy)
    assert upstream.count("GET", f"/blobs/{digest}") <= 1 + 4 * 6  # bounded, not a hot loop

    upstream.clear_faults()
    fresh = await request(url)
    assert (fresh.status, fresh.error, fresh.headers and fresh.headers["X-Cache"]) == (
        200,
        None,
        "MISS",
    ), fresh
    assert fresh.body == data
    assert stored_blobs_verify(proxy.storage) == {digest: len(data)}


# -- corrupted downloads, many clients ------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [FlipByte(2 * MiB - 100), WrongLength(-7), WrongLength(+7)],
    ids=["flip-near-end", "short", "long"],
)
async def test_corrupted_download_fails_every_concurrent_client(
    big: BigImages, front: FrontFactory, proxy_factory: ProxyFactory, fault: Any
) -> None:
    digest, data = big.layer("library/mid:1")
    upstream = front(big.registry)
    upstream.add_fault(blob_get(digest), fault, times=100)
    proxy = proxy_factory(upstream.url)
    url = f"{proxy.url}/v2/library/mid/blobs/{digest}"

    results = await requests_at_once(url, 10)
    for got in results:
        assert_failed_not_complete(got)
        assert got.body == data[: len(got.body)] or got.status != 200, got
    assert not blob_file(proxy, digest).exists()
    assert await eventually(lambda: not temp_files(proxy)), temp_files(proxy)

    upstream.clear_faults()
    fresh = await request(url)
    assert (fresh.status, fresh.error, fresh.body) == (200, None, data), fresh
    assert fresh.headers is not None and fresh.headers["X-Cache"] == "MISS"
    hit = await request(url)
    assert hit.headers is not None and (hit.status, hit.headers["X-Cache"]) == (200, "HIT")


async def test_failing_downloads_under_load_never_wedge_the_blob(
    big: BigImages, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    """Many clients keep asking for a blob whose downloads keep failing (a flipped byte): each
    gets a failure quickly, and once upstream is healthy the blob downloads."""
    digest, data = big.layer("library/mid:1")
    upstream = front(big.registry)
    upstream.add_fault(blob_get(digest), FlipByte(10), times=1_000_000)
    proxy = proxy_factory(upstream.url)
    url = f"{proxy.url}/v2/library/mid/blobs/{digest}"
    deadline = time.monotonic() + 2.5
    hung = 0

    async def keep_asking(session: aiohttp.ClientSession) -> None:
        nonlocal hung
        while time.monotonic() < deadline:
            try:
                got = await asyncio.wait_for(request(url, session=session), 5)
            except TimeoutError:
                hung += 1
                return
            assert_failed_not_complete(got)

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await asyncio.gather(*(keep_asking(session) for _ in range(150)))
    assert hung == 0, f"{hung} clients got no answer within 5 s"

    upstream.clear_faults()
    fresh = await asyncio.wait_for(request(url), 10)
    assert (fresh.status, fresh.error, fresh.body) == (200, None, data), fresh


# -- broken manifest bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [CutAfter(10), WrongLength(+5), WrongLength(-5), FlipByte(3)],
    ids=["cut", "long", "short", "flip"],
)
async def test_broken_manifest_body_is_a_registry_error_and_not_cached(
    proxy_factory: ProxyFactory,
    upstream: Front,
    seeded_registry: SeededRegistry,
    fault: Any,
) -> None:
    image = seeded_registry["library/alpine:3.19"]
    proxy = proxy_factory(upstream.url)
    upstream.add_fault(path_contains("/manifests/", "GET"), fault, times=100)
    url = f"{proxy.url}/v2/library/alpine/manifests/3.19"

    got = await request(url)
    assert got.status == 503, got
    assert got.registry_error() == "UNAVAILABLE"
    assert not manifest_file(proxy, image.digest).exists()
    assert "Traceback" not in proxy.logs()

    upstream.clear_faults()
    fresh = await request(url)
    assert (fresh.status, fresh.body) == (200, image.raw), fresh


async def test_broken_tags_list_body_is_a_registry_error(
    proxy_factory: ProxyFactory, upstream: Front
) -> None:
    proxy = proxy_factory(upstream.url)
    upstream.add_fault(path_contains("/tags/list", "GET"), CutAfter(5), times=100)
    got = await request(f"{proxy.url}/v2/myteam/app/tags/list")
    assert got.status == 503, got
    assert got.registry_error() == "UNAVAILABLE"
    assert "Traceback" not in proxy.logs()


# -- 5xx and refused connections on manifests --------------------------------------------------


@pytest.mark.parametrize("failure", ["500", "502", "503", "504", "refused"])
async def test_failing_upstream_serves_cached_tags_stale_and_errors_otherwise(
    proxy_factory: ProxyFactory,
    upstream: Front,
    seeded_registry: SeededRegistry,
    failure: str,
) -> None:
    image = seeded_registry["library/busybox:1.36"]
    child = next(iter(image.children.values()))
    proxy = proxy_factory(upstream.url, extra_args=["--tag-ttl", "0s"])
    base = f"{proxy.url}/v2/library/busybox"
    for path in ("manifests/1.36", f"manifests/{child.digest}", f"blobs/{child.config_digest}"):
        assert (await request(f"{base}/{path}")).status == 200

    if failure == "refused":
        upstream.stop()
    else:
        upstream.add_fault(any_request, Status(int(failure)), times=10_000)
    upstream.reset()

    # all at once: each waits out the proxy's retries (0.2 + 0.4 + 0.8 s) on its own
    paths = ("manifests/other-tag", f"blobs/{child.layers[0]}", "manifests/1.0")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        stale, head, cached_blob, *missing = await asyncio.gather(
            request(f"{base}/manifests/1.36", session=session),
            request(f"{base}/manifests/1.36", "HEAD", session=session),
            request(f"{base}/blobs/{child.config_digest}", session=session),
            *(
                request(f"{base}/{path}", method, session=session)
                for path in paths
                for method in ("GET", "HEAD")
            ),
        )
    assert stale.headers is not None, stale
    assert (stale.status, stale.headers["X-Cache"], stale.body) == (200, "STALE", image.raw)
    assert head.headers is not None
    assert (head.status, head.headers["Docker-Content-Digest"]) == (200, image.digest)
    assert head.headers["X-Cache"] == "STALE"
    assert (cached_blob.status, cached_blob.body) == (200, image.blobs[child.config_digest])

    # nothing cached: a clear registry error, never a hang, a 500 or a 404
    for got in missing:
        assert got.status == 503, got
        if got.body:
            assert got.registry_error() == "UNAVAILABLE"
    assert sum(1 for got in missing if got.body) == len(paths)  # the GETs have a body
    if failure != "refused":
        # retried with back-off (502/503/504), but bounded: at most 4 tries per request
        assert upstream.count() <= 8 * 4, upstream.count()

    if failure == "refused":
        upstream.start()
    upstream.clear_faults()
    fresh = await request(f"{base}/manifests/1.36")
    assert fresh.headers is not None
    assert (fresh.status, fresh.body) == (200, image.raw)
    assert fresh.headers["X-Cache"] in ("HIT", "MISS")


async def test_upstream_read_timeout_serves_stale_or_a_clear_error(
    proxy_factory: ProxyFactory,
    upstream: Front,
    seeded_registry: SeededRegistry,
    tmp_path: Path,
) -> None:
    """An upstream that accepts and then says nothing: bounded by the (configured) read
    timeout, then the cached tag is served stale, and what is not cached is a 503."""
    image = seeded_registry["library/busybox:1.36"]
    config = tmp_path / "timeouts.yml"
    config.write_text(
        "upstreams:\n"
        "  docker.io:\n"
        "    url: http://upstream.invalid\n"  # replaced by --upstream
        "    connect_timeout: 1s\n"
        "    read_timeout: 1s\n"
    )
    proxy = proxy_factory(upstream.url, extra_args=["--config", str(config), "--tag-ttl", "0s"])
    base = f"{proxy.url}/v2/library/busybox"
    assert (await request(f"{base}/manifests/1.36")).status == 200

    upstream.add_fault(any_request, Stall(4), times=10_000)
    started = time.monotonic()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        stale, head, missing = await asyncio.gather(
            request(f"{base}/manifests/1.36", session=session),
            request(f"{base}/manifests/1.36", "HEAD", session=session),
            request(f"{base}/manifests/not-cached", session=session),
        )
    elapsed = time.monotonic() - started
    assert stale.headers is not None and head.headers is not None, (stale, head)
    assert (stale.status, stale.headers["X-Cache"], stale.body) == (200, "STALE", image.raw)
    assert (head.status, head.headers["X-Cache"]) == (200, "STALE")
    assert missing.status == 503 and missing.registry_error() == "UNAVAILABLE", missing
    # 1 s per try, a few tries with back-off: seconds, not the default minute
    assert elapsed < 12, elapsed


# -- 429 --------------------------------------------------------------------------------------


def _retry_after(kind: str, seconds: int) -> str | None:
    if kind == "seconds":
        return str(seconds)
    if kind == "http-date":
        return email.utils.formatdate(time.time() + seconds + 1, usegmt=True)
    return None


@pytest.mark.parametrize("kind", ["seconds", "http-date", "absent"])
async def test_rate_limit_keeps_serving_the_cache_and_backs_off_until_retry_after(
    proxy_factory: ProxyFactory,
    upstream: Front,
    seeded_registry: SeededRegistry,
    kind: str,
) -> None:
    image = seeded_registry["library/busybox:1.36"]
    child = next(iter(image.children.values()))
    proxy = proxy_factory(upstream.url, extra_args=["--tag-ttl", "0s"])
    base = f"{proxy.url}/v2/library/busybox"
    for path in ("manifests/1.36", f"manifests/{child.digest}", f"blobs/{child.config_digest}"):
        assert (await request(f"{base}/{path}")).status == 200

    wait = 3
    status = too_many_requests(None)
    value = _retry_after(kind, wait)
    headers = dict(status.headers)
    if value is not None:
        headers["Retry-After"] = value
    upstream.add_fault(any_request, Status(429, headers, status.body), times=10_000)
    upstream.reset()
    started = time.monotonic()

    first = await request(f"{base}/manifests/1.36")  # the one request that meets the 429
    assert first.headers is not None, first
    assert (first.status, first.headers["X-Cache"], first.body) == (200, "STALE", image.raw)
    assert upstream.count() == 1
    upstream.reset()

    # backing off: cached content is served, the rest is 429, and upstream hears nothing
    for _ in range(3):
        got = await request(f"{base}/manifests/1.36")
        assert got.headers is not None and (got.status, got.headers["X-Cache"]) == (200, "STALE")
        got = await request(f"{base}/manifests/1.36", "HEAD")
        assert got.status == 200
        got = await request(f"{base}/manifests/{child.digest}")
        assert (got.status, got.body) == (200, child.raw)
        got = await request(f"{base}/blobs/{child.config_digest}")
        assert got.status == 200
        for path in (f"blobs/{child.layers[0]}", "manifests/latest", "tags/list"):
            got = await request(f"{base}/{path}")
            assert got.status == 429, (path, got)
            assert got.registry_error() == "TOOMANYREQUESTS"
            assert got.headers is not None
            if kind != "absent":
                assert 1 <= int(got.headers["Retry-After"]) <= wait + 1, got.headers
        await asyncio.sleep(0.3)
    assert upstream.count() == 0, [(r.method, r.path) for r in upstream.requests]

    if kind == "absent":
        return  # the default back-off (60 s) is too long to wait for here
    upstream.clear_faults()
    await asyncio.sleep(max(0.0, started + wait + 1.2 - time.monotonic()))
    fresh = await request(f"{base}/manifests/1.36")
    assert fresh.headers is not None
    assert (fresh.status, fresh.body) == (200, image.raw)
    assert fresh.headers["X-Cache"] != "STALE"
    layer = await request(f"{base}/blobs/{child.layers[0]}")
    assert (layer.status, layer.body) == (200, image.blobs[child.layers[0]])
    assert upstream.count() >= 2


# -- redirects to a CDN ---------------------------------------------------------------------------


@pytest.mark.parametrize("login", [False, True], ids=["anonymous", "with-credentials"])
async def test_blob_redirect_followed_without_authorization_to_the_cdn(
    token_registry: Any, front: FrontFactory, proxy_factory: ProxyFactory, login: bool
) -> None:
    image: SeededImage = token_registry.image
    cdn = front(token_registry.registry)
    upstream = front(token_registry.registry)
    upstream.add_fault(path_contains("/blobs/", "GET"), RedirectTo(cdn), times=1000)
    # the CDN cuts the first transfer: the resume goes through the registry's redirect again
    cdn.add_fault(path_contains("/_cdn/", "GET"), CutAfter(100), times=1)
    kwargs: dict[str, Any] = {}
    if login:
        user, password = token_registry.creds
        kwargs = {
            "extra_args": ["--upstream-username", user],
            "env": {"REGPROXY_UPSTREAM_PASSWORD": password},
        }
    proxy = proxy_factory(upstream.url, **kwargs)
    base = f"{proxy.url}/v2/library/alpine"

    assert (await request(f"{base}/manifests/3.19")).body == image.raw
    digests: list[str] = []
    for child in image.children.values():
        assert (await request(f"{base}/manifests/{child.digest}")).body == child.raw
        digests += [child.config_digest, *child.layers]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        results = await asyncio.gather(
            *(request(f"{base}/blobs/{d}", session=session) for d in digests)
        )
    for digest, got in zip(digests, results, strict=True):
        assert (got.status, got.error, got.body) == (200, None, image.blobs[digest]), got

    blob_requests = [r for r in upstream.requests if "/blobs/" in r.path and r.method == "GET"]
    assert blob_requests and all(
        r.headers.get("Authorization", "").startswith("Bearer ") for r in blob_requests
    ), "the registry's own origin gets the token"
    assert upstream.saw_authorization
    assert cdn.count("GET", "/_cdn/") >= len(set(digests))
    assert any("Range" in r.headers for r in cdn.requests), "the cut transfer was resumed"
    assert not cdn.saw_authorization, "Authorization leaked to the redirect target"
    if login:
        assert token_registry.issuer.count(username=token_registry.creds[0]) >= 1
