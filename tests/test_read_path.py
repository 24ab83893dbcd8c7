"""The read path against a real upstream registry: bytes, headers, upstream request counts.

The proxy runs as ``regproxy serve`` in a subprocess; a counting ``Front`` sits between it and
the real ``docker-registry`` so every upstream request can be counted and faults injected.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.harness.front import (
    CutAfter,
    Drip,
    FlipByte,
    Front,
    Status,
    WrongLength,
    blob,
    manifest,
    too_many_requests,
)
from tests.harness.images import MANIFEST_TYPES, SeededImage, SeededRegistry, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry

ACCEPT = ", ".join(MANIFEST_TYPES)
ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    hdrs = {"Accept": ACCEPT, **(headers or {})}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, URL(url, encoded=True), headers=hdrs) as resp,
    ):
        return resp.status, resp.headers, await resp.read()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


@pytest.fixture
def upstream(seeded_registry: SeededRegistry, front: FrontFactory) -> Front:
    """A counting front to the shared seeded registry."""
    return front(seeded_registry.registry)


@pytest.fixture
def proxy(upstream: Front, proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory(upstream.url)


async def test_base_endpoint(proxy: ProxyProcess) -> None:
    status, headers, body = await fetch(f"{proxy.url}/v2/")
    assert status == 200
    assert json.loads(body) == {}
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize(
    "ref",
    ["library/alpine:3.19", "library/busybox:1.36", "library/hello:latest", "library/redis:7"],
)
async def test_manifests_pass_through_byte_for_byte(
    proxy: ProxyProcess, seeded_registry: SeededRegistry, ref: str
) -> None:
    image = seeded_registry[ref]
    for reference, raw in [(image.tag, image.raw), *image.manifests.items()]:
        url = f"{proxy.url}/v2/{image.repository}/manifests/{reference}"
        status, headers, body = await fetch(url)
        assert status == 200
        assert body == raw
        assert headers["Docker-Content-Digest"] == sha256(raw)
        assert headers["Content-Length"] == str(len(raw))
        assert headers["Content-Type"] == json.loads(raw).get("mediaType", image.media_type)
        status, head_headers, head_body = await fetch(url, "HEAD")
        assert status == 200 and head_body == b""
        for name in ("Docker-Content-Digest", "Content-Type", "Content-Length"):
            assert head_headers[name] == headers[name]


async def test_single_name_gets_library_prefix(
    proxy: ProxyProcess, seeded_registry: SeededRegistry
) -> None:
    image = seeded_registry["library/alpine:3.19"]
    status, _, body = await fetch(f"{proxy.url}/v2/alpine/manifests/3.19")
    assert status == 200 and body == image.raw


async def test_second_pull_makes_no_upstream_requests(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    image = seeded_registry["library/busybox:1.36"]

    async def pull() -> None:
        status, _, index = await fetch(f"{proxy.url}/v2/library/busybox/manifests/1.36")
        assert status == 200 and index == image.raw
        for child in image.children.values():
            status, _, raw = await fetch(f"{proxy.url}/v2/library/busybox/manifests/{child.digest}")
            assert raw == child.raw
            for digest in (child.config_digest, *child.layers):
                status, headers, data = await fetch(
                    f"{proxy.url}/v2/library/busybox/blobs/{digest}"
                )
                assert status == 200
                assert data == image.blobs[digest]
                assert headers["Docker-Content-Digest"] == digest

    await pull()
    blob_gets = upstream.count("GET", "/blobs/")
    assert blob_gets == sum(1 + len(c.layers) for c in image.children.values())
    upstream.reset()
    await pull()
    assert upstream.count() == 0


async def test_blob_headers_and_range(proxy: ProxyProcess, seeded_registry: SeededRegistry) -> None:
    image = seeded_registry["library/redis:7"]
    digest = image.child("linux/amd64").layers[0]
    data = image.blobs[digest]
    url = f"{proxy.url}/v2/library/redis/blobs/{digest}"
    status, headers, body = await fetch(url, "HEAD")  # cold HEAD: upstream HEAD only
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))
    status, headers, body = await fetch(url)
    assert (status, headers["X-Cache"], body) == (200, "MISS", data)
    status, headers, body = await fetch(url, headers={"Range": "bytes=100-199"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert body == data[100:200]
    status, headers, body = await fetch(url, "HEAD")
    assert (status, headers["X-Cache"], headers["Content-Length"]) == (200, "HIT", str(len(data)))


async def test_concurrent_cold_gets_make_one_upstream_get(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(
        registry, "library/big", "1", platforms=("linux/amd64",), layer_sizes=(6 * 1024 * 1024,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    proxy = proxy_factory(upstream.url)
    results = await asyncio.gather(
        *(fetch(f"{proxy.url}/v2/library/big/blobs/{digest}") for _ in range(12))
    )
    for status, headers, body in results:
        assert status == 200
        assert sha256(body) == digest
        assert headers["Docker-Content-Digest"] == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_tag_ttl_then_head_revalidation(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    first = seed_image(registry, "library/moving", "v", platforms=("linux/amd64",))
    upstream = front(registry)
    proxy = proxy_factory(upstream.url, extra_args=["--tag-ttl", "1s"])
    url = f"{proxy.url}/v2/library/moving/manifests/v"
    assert (await fetch(url))[2] == first.raw
    upstream.reset()
    status, headers, body = await fetch(url)  # within the TTL: no upstream request
    assert (status, headers["X-Cache"], body) == (200, "HIT", first.raw)
    assert upstream.count() == 0
    await asyncio.sleep(1.2)
    status, headers, body = await fetch(url)  # expired, unchanged: one HEAD, no GET
    assert (status, body) == (200, first.raw)
    assert upstream.count("HEAD", "/manifests/v") == 1
    assert upstream.count("GET", "/manifests/") == 0
    second = seed_image(registry, "library/moving", "v", platforms=("linux/amd64",))
    await asyncio.sleep(1.2)
    upstream.reset()
    status, headers, body = await fetch(url)  # moved: HEAD, then one GET of the new digest
    assert (status, headers["Docker-Content-Digest"], body) == (200, second.digest, second.raw)
    assert upstream.count("HEAD") == 1
    assert upstream.count("GET", "/manifests/") == 1
    upstream.reset()
    await asyncio.sleep(1.2)
    status, headers, _ = await fetch(url, "HEAD")  # a client HEAD never becomes an upstream GET
    assert status == 200 and headers["Docker-Content-Digest"] == second.digest
    assert upstream.count("GET") == 0


async def test_upstream_gone_cached_tag_still_served(
    registry: Registry, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(registry, "library/alpine", "edge", platforms=("linux/amd64",))
    proxy = proxy_factory(registry.url, extra_args=["--tag-ttl", "0s"])
    child = image.child("linux/amd64")
    base = f"{proxy.url}/v2/library/alpine"
    for path in (
        "manifests/edge",
        f"manifests/{child.digest}",
        *(f"blobs/{d}" for d in (child.config_digest, *child.layers)),
    ):
        assert (await fetch(f"{base}/{path}"))[0] == 200
    registry.stop()
    status, headers, body = await fetch(f"{base}/manifests/edge")
    assert (status, headers["X-Cache"], body) == (200, "STALE", image.raw)
    status, headers, _ = await fetch(f"{base}/manifests/edge", "HEAD")
    assert (status, headers["Docker-Content-Digest"]) == (200, image.digest)
    # a restarted proxy serves the same from disk
    proxy.restart()
    status, _, body = await fetch(f"{base}/manifests/edge")
    assert (status, body) == (200, image.raw)
    for digest in (child.config_digest, *child.layers):
        status, _, data = await fetch(f"{base}/blobs/{digest}")
        assert (status, data) == (200, image.blobs[digest])
    # nothing cached and no upstream: a registry error, 503
    status, _, body = await fetch(f"{base}/manifests/other")
    assert status == 503 and error_code(body) == "UNAVAILABLE"


async def test_truncated_upstream_blob_is_resumed(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    image = seeded_registry["library/redis:7"]
    digest = image.child("linux/arm64/v8").layers[0]
    upstream.add_fault(blob(digest, "GET"), CutAfter(10_000))
    status, _, body = await fetch(f"{proxy.url}/v2/library/redis/blobs/{digest}")
    assert status == 200 and body == image.blobs[digest]
    ranged = [r for r in upstream.requests if digest in r.path and "Range" in r.headers]
    assert [r.headers["Range"] for r in ranged] == ["bytes=10000-"]


@pytest.mark.parametrize(
    "fault", [FlipByte(500), WrongLength(-7), CutAfter(0)], ids=["flip", "short", "cut"]
)
async def test_bad_upstream_blob_never_cached_nor_served_complete(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry, fault: Any
) -> None:
    image = seeded_registry["library/alpine:3.19"]
    digest = image.child("linux/arm/v7").layers[0]
    good = image.blobs[digest]
    upstream.add_fault(blob(digest, "GET"), fault, times=20)
    url = f"{proxy.url}/v2/library/alpine/blobs/{digest}"
    try:
        status, _, body = await fetch(url)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        pass  # cut short of Content-Length: the client knows it failed
    else:
        # the failure was known before the response started: a clean registry error
        assert status == 503 and error_code(body) == "UNAVAILABLE"
    upstream.clear_faults()
    status, headers, body = await fetch(url)
    assert (status, headers["X-Cache"], body) == (200, "MISS", good)  # was not cached before
    assert (await fetch(url))[1]["X-Cache"] == "HIT"


async def test_client_disconnect_does_not_cancel_cache_fill(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(
        registry, "library/slow", "1", platforms=("linux/amd64",), layer_sizes=(4 * 1024 * 1024,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(8 * 1024 * 1024))  # half a second
    proxy = proxy_factory(upstream.url)
    algorithm, _, hexpart = digest.partition(":")
    stored = proxy.storage / "blobs" / algorithm / hexpart[:2] / hexpart
    url = f"{proxy.url}/v2/library/slow/blobs/{digest}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        await resp.content.read(1024)  # then leave
        assert not stored.exists()  # while the download is under way
    # no client asks for it meanwhile: the download goes on alone and fills the cache
    for _ in range(200):
        if stored.exists():
            break
        await asyncio.sleep(0.05)
    status, headers, body = await fetch(url)
    assert (status, headers["X-Cache"], body) == (200, "HIT", image.blobs[digest])
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_tags_list(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    status, _, body = await fetch(f"{proxy.url}/v2/myteam/app/tags/list")
    assert status == 200
    assert json.loads(body) == {"name": "myteam/app", "tags": ["1.0-amd64", "1.0-arm64"]}
    # n and last are passed through (distribution 2.8 itself does not paginate tags)
    query = "?n=1&last=1.0-amd64"
    status, _, body = await fetch(f"{proxy.url}/v2/myteam/app/tags/list{query}")
    direct = await fetch(f"{seeded_registry.url}/v2/myteam/app/tags/list{query}")
    assert (status, body) == (direct[0], direct[2])
    assert [r.query for r in upstream.requests if "/tags/list" in r.path][-1] in (
        "n=1&last=1.0-amd64",
        "last=1.0-amd64&n=1",
    )
    upstream.add_fault(lambda r: "/tags/list" in r.path, Status(503), times=100)
    status, headers, stale = await fetch(f"{proxy.url}/v2/myteam/app/tags/list{query}")
    assert (status, headers["X-Cache"], stale) == (200, "STALE", body)
    status, _, body = await fetch(f"{proxy.url}/v2/nobody/here/tags/list")
    assert status == 503 and error_code(body) == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/library/UPPER/manifests/1", 400, "NAME_INVALID"),
        ("/v2/library/%2e%2e/manifests/1", 400, "NAME_INVALID"),
        ("/v2/library/alpine/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/alpine/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/alpine/manifests/sha256:1234", 400, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/latest", 400, "DIGEST_INVALID"),
        ("/v2/library/alpine/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/alpine/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/library/alpine/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
    ],
)
async def test_errors(
    proxy: ProxyProcess, upstream: Front, path: str, status: int, code: str
) -> None:
    for method in ("GET", "HEAD"):
        got, headers, body = await fetch(proxy.url + path, method)
        assert got == status
        assert headers["Content-Type"].startswith("application/json")
        if method == "GET":
            assert error_code(body) == code
    if status == 400 or "INVALID" in path or path.endswith("-bad"):
        assert upstream.count() == 0  # refused before touching upstream


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_writes_are_unsupported(proxy: ProxyProcess, method: str) -> None:
    for path in (
        "/v2/library/alpine/blobs/uploads/",
        "/v2/library/alpine/manifests/1",
        "/v2/library/alpine/blobs/sha256:" + "0" * 64,
    ):
        status, _, body = await fetch(proxy.url + path, method)
        assert status == 405 and error_code(body) == "UNSUPPORTED"


async def test_rate_limited_with_nothing_cached(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    upstream.add_fault(manifest("1.36"), too_many_requests(30), times=5)
    status, headers, body = await fetch(f"{proxy.url}/v2/library/busybox/manifests/1.36")
    assert status == 429 and error_code(body) == "TOOMANYREQUESTS"
    assert headers["Retry-After"] == "30"
    # backing off: the next request does not reach upstream
    before = upstream.count()
    status, _, _ = await fetch(f"{proxy.url}/v2/library/busybox/manifests/1.36")
    assert status == 429
    assert upstream.count() == before


async def test_bearer_token_flow(
    token_registry: Any, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image: SeededImage = token_registry.image
    upstream = front(token_registry.registry)
    proxy = proxy_factory(upstream.url)
    child = next(iter(image.children.values()))
    base = f"{proxy.url}/v2/library/alpine"
    assert (await fetch(f"{base}/manifests/3.19"))[2] == image.raw
    assert (await fetch(f"{base}/manifests/{child.digest}"))[2] == child.raw
    for digest in child.layers:
        assert (await fetch(f"{base}/blobs/{digest}"))[2] == image.blobs[digest]
    # one token for the scope, reused for every later request
    assert token_registry.issuer.count(scope_contains="repository:library/alpine:pull") == 1
    # a client's own credentials are never forwarded upstream
    upstream.reset()
    await fetch(
        f"{base}/blobs/{child.config_digest}",
        headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="},
    )
    assert all("Y2xpZW50" not in r.headers.get("Authorization", "") for r in upstream.requests)
