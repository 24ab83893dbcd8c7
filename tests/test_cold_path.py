"""Cold blobs read by worker threads on their own upstream connections
(``proxy/fetch/threadget.py``, ``proxy/fetch/rawbody.py``).

Every blob GET is made by a thread rather than through aiohttp; these tests hold that path to
the same rules as every other: a wrong or short body reaches no client whole and is never cached,
a cut one resumes from the last byte that arrived, concurrent clients share the one download, an
error answer costs one upstream request. (``test_faults.py`` and ``test_read_path.py`` hold
every blob size to them too.)

The tests with an ``origin`` run twice (``scheme``): against a plain-HTTP Front and against a
TLS one (a certificate of ``local_ca``, which the proxy trusts through ``SSL_CERT_FILE``), so that
whichever reader takes a TLS body is held to the same rules, several cold blobs one after another
on the upstream's connections included::

    proxy --http or https--> Front (faults, counts) --http--> docker-registry

The last ones are about TLS upstreams only: a certificate the proxy does not trust fails the
client, and a blob redirected to a CDN on another origin (as Docker Hub does) is fetched there
without the registry's credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.harness.front import CutAfter, FlipByte, Front, RedirectTo, Req, Status, WrongLength
from tests.harness.images import seed_image
from tests.harness.registry import start_registry
from tests.harness.tlsca import LocalCA
from tests.harness.tokens import TokenRegistry
from tests.test_faults import (
    BigImages,
    FrontFactory,
    ProxyFactory,
    assert_failed_not_complete,
    blob_file,
    blob_get,
    eventually,
    request,
    requests_at_once,
    sha256,
    stored_blobs_verify,
    temp_files,
)

KiB = 1024
MiB = 1024 * KiB
SIZE = 12 * MiB


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigImages]:
    """A module-wide registry (read-only) with a single-layer image of ~12 MiB, and one whose
    layers are 6 MiB, 5 MiB and 16 KiB."""
    reg = start_registry(tmp_path_factory.mktemp("cold-path-registry"))
    try:
        one = ("linux/amd64",)
        images = {
            "library/huge:1": seed_image(
                reg, "library/huge", "1", platforms=one, layer_sizes=(SIZE,)
            ),
            "library/layers:1": seed_image(
                reg, "library/layers", "1", platforms=one, layer_sizes=(6 * MiB, 5 * MiB, 16 * KiB)
            ),
        }
        yield BigImages(reg, images)
    finally:
        reg.stop()


@pytest.fixture(params=["http", "https"])
def scheme(request: pytest.FixtureRequest) -> str:
    """How the proxy reaches the upstream Front."""
    return str(request.param)


@pytest.fixture
def origin(scheme: str, front: FrontFactory, local_ca: LocalCA) -> FrontFactory:
    """``front`` serving ``scheme`` (HTTPS with a ``local_ca`` certificate)."""

    def make(upstream: Any, **kwargs: Any) -> Front:
        if scheme == "https":
            kwargs.setdefault("ssl_context", local_ca.server_context())
        instance = front(upstream, **kwargs)
        assert instance.url.startswith(f"{scheme}://")
        return instance

    return make


@pytest.mark.parametrize(
    "fault",
    [FlipByte(SIZE - 3 * MiB), FlipByte(5), WrongLength(-7), WrongLength(+7)],
    ids=["flip-late", "flip-early", "short", "long"],
)
async def test_wrong_body_fails_every_client_and_is_not_cached(
    huge: BigImages,
    origin: FrontFactory,
    proxy_factory: ProxyFactory,
    local_ca: LocalCA,
    fault: Any,
) -> None:
    digest, data = huge.layer("library/huge:1")
    upstream = origin(huge.registry)
    upstream.add_fault(blob_get(digest), fault, times=100)
    proxy = proxy_factory(upstream.url, env=local_ca.env())
    url = f"{proxy.url}/v2/library/huge/blobs/{digest}"

    results = await requests_at_once(url, 6)
    for got in results:
        assert_failed_not_complete(got)
        if not isinstance(fault, FlipByte):
            assert got.body == data[: len(got.body)], got
    assert not blob_file(proxy, digest).exists()
    assert await eventually(lambda: not temp_files(proxy)), temp_files(proxy)

    upstream.clear_faults()
    fresh = await request(url)
    assert (fresh.status, fresh.error) == (200, None), fresh
    assert fresh.body == data
    assert fresh.headers is not None and fresh.headers["X-Cache"] == "MISS"
    assert stored_blobs_verify(proxy.storage) == {digest: len(data)}


async def test_cut_body_resumes_after_the_last_byte_for_every_follower(
    huge: BigImages, origin: FrontFactory, proxy_factory: ProxyFactory, local_ca: LocalCA
) -> None:
    digest, data = huge.layer("library/huge:1")
    upstream = origin(huge.registry)
    upstream.add_fault(blob_get(digest, ranged=False), CutAfter(1_000_001))
    upstream.add_fault(blob_get(digest, ranged=True), CutAfter(1_234_567))
    proxy = proxy_factory(upstream.url, env=local_ca.env())
    url = f"{proxy.url}/v2/library/huge/blobs/{digest}"

    results = await requests_at_once(url, 8)
    for got in results:
        assert (got.status, got.error) == (200, None), got
        assert len(got.body) == len(data) and sha256(got.body) == digest
    ranges = [r.headers["Range"] for r in upstream.requests if blob_get(digest, ranged=True)(r)]
    assert ranges == ["bytes=1000001-", "bytes=2234568-"]
    assert upstream.count("GET", f"/blobs/{digest}") == 3
    assert stored_blobs_verify(proxy.storage) == {digest: len(data)}
    hit = await request(url)
    assert hit.headers is not None and (hit.status, hit.headers["X-Cache"]) == (200, "HIT")
    assert hit.body == data


@pytest.mark.parametrize("at_once", [False, True], ids=["one-after-another", "at-once"])
async def test_several_cold_blobs_from_one_upstream_arrive_intact(
    huge: BigImages,
    origin: FrontFactory,
    proxy_factory: ProxyFactory,
    local_ca: LocalCA,
    at_once: bool,
) -> None:
    huge_image, layers = huge.images["library/huge:1"], huge.images["library/layers:1"]
    (huge_child,) = huge_image.children.values()
    (child,) = layers.children.values()
    blobs = {**huge_image.blobs, **layers.blobs}
    # Large and small bodies alternate on the connections the threads keep between them.
    order = [
        huge_child.layers[0],
        huge_child.config_digest,
        child.layers[0],
        child.config_digest,
        child.layers[1],
        child.layers[2],
    ]
    assert sorted(order) == sorted(blobs)
    upstream = origin(huge.registry)
    proxy = proxy_factory(upstream.url, env=local_ca.env())

    def url(digest: str) -> str:
        repository = "library/huge" if digest in huge_image.blobs else "library/layers"
        return f"{proxy.url}/v2/{repository}/blobs/{digest}"

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        if at_once:
            results = await asyncio.gather(*(request(url(d), session=session) for d in order))
        else:
            results = [await request(url(d), session=session) for d in order]
    for digest, got in zip(order, results, strict=True):
        assert (got.status, got.error) == (200, None), (digest, got)
        assert sha256(got.body) == digest and got.body == blobs[digest], (digest, got)
    assert {d: upstream.count("GET", f"/blobs/{d}") for d in order} == dict.fromkeys(order, 1)
    assert stored_blobs_verify(proxy.storage) == {d: len(blobs[d]) for d in order}
    assert await eventually(lambda: not temp_files(proxy)), temp_files(proxy)


async def test_tls_upstream_is_trusted_through_its_ca_only(
    huge: BigImages, front: FrontFactory, proxy_factory: ProxyFactory, local_ca: LocalCA
) -> None:
    digest, data = huge.layer("library/huge:1")
    upstream = front(huge.registry, ssl_context=local_ca.server_context())
    distrusting = proxy_factory(upstream.url)
    refused = await request(f"{distrusting.url}/v2/library/huge/blobs/{digest}")
    assert refused.status is not None and refused.status >= 500, refused
    refused.registry_error()
    assert upstream.count() == 0, "no request is made over an unverified connection"
    assert not blob_file(distrusting, digest).exists()

    trusting = proxy_factory(upstream.url, env=local_ca.env())
    got = await request(f"{trusting.url}/v2/library/huge/blobs/{digest}")
    assert (got.status, got.error, got.body) == (200, None, data), got
    assert upstream.count("GET", f"/blobs/{digest}") == 1


def _anonymous(req: Req) -> bool:
    return "Authorization" not in req.headers


async def test_tls_blob_redirected_to_another_origin_is_fetched_there_without_authorization(
    huge: BigImages, front: FrontFactory, proxy_factory: ProxyFactory, local_ca: LocalCA
) -> None:
    """Docker Hub's way: the registry answers a blob GET with a 307 to a CDN on another origin."""
    digest, data = huge.layer("library/huge:1")
    cdn = front(huge.registry, ssl_context=local_ca.server_context())
    upstream = front(huge.registry, ssl_context=local_ca.server_context())
    assert cdn.url.startswith("https://") and cdn.url != upstream.url
    # Basic credentials, asked for: the proxy then holds an Authorization it must not pass on.
    challenge = Status(401, {"WWW-Authenticate": 'Basic realm="registry"'})
    upstream.add_fault(_anonymous, challenge, times=1000)
    upstream.add_fault(blob_get(digest), RedirectTo(cdn), times=1000)
    proxy = proxy_factory(
        upstream.url,
        extra_args=["--upstream-username", "alice"],
        env={**local_ca.env(), "REGPROXY_UPSTREAM_PASSWORD": "alice-secret"},
    )
    url = f"{proxy.url}/v2/library/huge/blobs/{digest}"

    got = await request(url)
    assert (got.status, got.error) == (200, None), got
    assert sha256(got.body) == digest and got.body == data
    asked = [r for r in upstream.requests if blob_get(digest)(r)]
    assert [(r.status, r.fault) for r in asked] == [(401, "Status"), (307, "RedirectTo")]
    assert asked[1].headers["Authorization"].startswith("Basic ")
    (fetched,) = cdn.requests
    assert fetched.method == "GET" and fetched.path.endswith(f"/blobs/{digest}"), fetched
    assert fetched.status == 200 and "Authorization" not in fetched.headers
    assert not cdn.saw_authorization, "Authorization leaked to the redirect target"
    assert stored_blobs_verify(proxy.storage) == {digest: len(data)}
    assert await eventually(lambda: not temp_files(proxy)), temp_files(proxy)

    seen = (upstream.count(), cdn.count())
    hit = await request(url)
    assert hit.headers is not None and (hit.status, hit.headers["X-Cache"]) == (200, "HIT")
    assert hit.body == data
    assert (upstream.count(), cdn.count()) == seen


async def test_tls_token_upstream_blob_before_any_manifest(
    token_registry: TokenRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    local_ca: LocalCA,
) -> None:
    """Docker Hub's way again: Bearer tokens, over TLS. A blob asked for before anything else
    of its repository meets the 401 challenge itself; one token then serves every later blob."""
    image = token_registry.image
    child = next(iter(image.children.values()))
    upstream = front(token_registry.registry, ssl_context=local_ca.server_context())
    proxy = proxy_factory(upstream.url, env=local_ca.env())
    base = f"{proxy.url}/v2/library/alpine"

    first, *rest = [child.config_digest, *child.layers]
    got = await request(f"{base}/blobs/{first}")
    assert (got.status, got.error) == (200, None), got
    assert got.body == image.blobs[first]
    asked = [r for r in upstream.requests if blob_get(first)(r)]
    assert [r.status for r in asked] == [401, 200]
    assert asked[1].headers["Authorization"].startswith("Bearer ")
    for digest in rest:
        got = await request(f"{base}/blobs/{digest}")
        assert (got.status, got.error, got.body) == (200, None, image.blobs[digest]), got
        assert [r.status for r in upstream.requests if blob_get(digest)(r)] == [200]
    assert token_registry.issuer.count(scope_contains="repository:library/alpine:pull") == 1
    assert stored_blobs_verify(proxy.storage) == {d: len(image.blobs[d]) for d in (first, *rest)}


async def test_blob_errors_are_asked_once_and_answered_as_registry_errors(
    huge: BigImages, origin: FrontFactory, proxy_factory: ProxyFactory, local_ca: LocalCA
) -> None:
    """An unknown blob and a rate limit, over plain HTTP and TLS: one upstream request each,
    the registry's error to the client, and after a 429 no further request until it is over."""
    upstream = origin(huge.registry)
    proxy = proxy_factory(upstream.url, env=local_ca.env())
    missing = "sha256:" + "0" * 64
    got = await request(f"{proxy.url}/v2/library/huge/blobs/{missing}")
    assert got.status == 404 and got.registry_error() == "BLOB_UNKNOWN", got
    assert upstream.count("GET", f"/blobs/{missing}") == 1

    digest, _ = huge.layer("library/huge:1")
    limited = Status(429, {"Retry-After": "60"}, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}')
    upstream.add_fault(blob_get(digest), limited, times=100)
    for _ in range(2):
        got = await request(f"{proxy.url}/v2/library/huge/blobs/{digest}")
        assert got.status == 429 and got.registry_error() == "TOOMANYREQUESTS", got
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert not blob_file(proxy, digest).exists()


async def test_a_kept_connection_the_upstream_closed_is_not_used_again(
    huge: BigImages, origin: FrontFactory, proxy_factory: ProxyFactory, local_ca: LocalCA
) -> None:
    """The upstream closes idle connections after 0.2 s (as CDNs do, later): the connection kept
    from the first blob is dead by the second, which still costs one request and arrives whole."""
    layers = huge.images["library/layers:1"]
    (child,) = layers.children.values()
    first, second = child.layers[0], child.layers[1]
    upstream = origin(huge.registry)
    upstream.stop()
    upstream.keepalive_timeout = 0.2
    upstream.start()
    proxy = proxy_factory(upstream.url, env=local_ca.env())
    base = f"{proxy.url}/v2/library/layers/blobs"
    got = await request(f"{base}/{first}")
    assert (got.status, got.error, got.body) == (200, None, layers.blobs[first]), got
    await asyncio.sleep(0.6)
    got = await request(f"{base}/{second}")
    assert (got.status, got.error, got.body) == (200, None, layers.blobs[second]), got
    assert upstream.count("GET", f"/blobs/{second}") == 1
