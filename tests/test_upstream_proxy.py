"""An upstream reached through a corporate forward proxy: ``HTTP_PROXY``, ``HTTPS_PROXY`` and
``NO_PROXY`` in regproxy's environment, as distribution, containerd and curl honour them.

The forward proxy is a real one, Debian's ``tinyproxy`` (``tests/harness/httpproxy.py``)::

    client --> proxy under test --(absolute-form GET, or CONNECT for https)--> tinyproxy
                                                        --> Front (counts) --> docker-registry

What a user checks: the image arrives whole; every upstream request went through the proxy
(stop the proxy and a cold blob cannot be had, even though the upstream is up); a host that
``NO_PROXY`` names is reached directly; a redirect is judged by its own host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.front import Front, RedirectTo, Req
from tests.harness.httpproxy import HttpProxy
from tests.harness.images import SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry
from tests.harness.tlsca import LocalCA
from tests.harness.tokens import TokenRegistry
from tests.harness.tools import free_port
from tests.test_faults import blob_get
from tests.test_operations import pull
from tests.test_read_path import fetch

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
MiB = 1024 * 1024


@pytest.fixture
def http_proxy(tmp_path: Path) -> Iterator[HttpProxy]:
    proxy = HttpProxy(tmp_path / "tinyproxy").start()
    try:
        yield proxy
    finally:
        proxy.stop()


def proxy_env(proxy_url: str, no_proxy: str = "") -> dict[str, str]:
    """Both spellings, so that whatever the test runner's own environment holds is overridden
    (lower case wins where both are set)."""
    env = {}
    for name, value in (
        ("http_proxy", proxy_url),
        ("https_proxy", proxy_url),
        ("no_proxy", no_proxy),
    ):
        env[name] = env[name.upper()] = value
    return env


def via_proxy(req: Req) -> bool:
    return "tinyproxy" in req.headers.get("Via", "")


def image_of(registry: Registry, name: str) -> SeededImage:
    return seed_image(
        registry, name, "1", platforms=("linux/amd64",), layer_sizes=(3 * MiB, 200_000)
    )


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_every_upstream_request_goes_through_the_proxy(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    http_proxy: HttpProxy,
    local_ca: LocalCA,
    scheme: str,
) -> None:
    image = image_of(registry, "library/behindproxy")
    extra: dict[str, Any] = {}
    if scheme == "https":
        extra["ssl_context"] = local_ca.server_context()
    upstream = front(registry, **extra)
    assert upstream.url.startswith(f"{scheme}://")
    proxy = proxy_factory(upstream.url, env={**local_ca.env(), **proxy_env(http_proxy.url)})
    child = image.child("linux/amd64")
    first, second = child.layers

    # the manifests, the config and the first layer: whole, each asked upstream once
    base = f"{proxy.url}/v2/library/behindproxy"
    status, _, body = await fetch(f"{base}/manifests/1")
    assert (status, body) == (200, image.raw)
    for digest in (child.config_digest, first):
        status, _, body = await fetch(f"{base}/blobs/{digest}")
        assert status == 200 and body == image.blobs[digest]
        assert upstream.count("GET", f"/blobs/{digest}") == 1
    asked = http_proxy.requests()
    if scheme == "http":  # absolute-form requests, which the proxy marks with Via
        assert f"GET {upstream.url}/v2/library/behindproxy/blobs/{first}" in asked
        assert upstream.requests and all(via_proxy(r) for r in upstream.requests)
    else:  # tunnels
        assert asked and set(asked) == {f"CONNECT {upstream.url.removeprefix('https://')}"}

    # without the proxy the upstream cannot be reached, though it is up: no direct requests
    http_proxy.stop()
    status, _, body = await fetch(f"{base}/blobs/{second}")
    assert status == 503, body
    assert b'"errors"' in body
    assert upstream.count("GET", f"/blobs/{second}") == 0
    # what came through the proxy is cached
    status, headers, body = await fetch(f"{base}/blobs/{first}")
    assert status == 200 and body == image.blobs[first] and headers["X-Cache"] == "HIT"


async def test_no_proxy_host_is_reached_directly(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
) -> None:
    image = image_of(registry, "library/direct")
    upstream = front(registry)
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    proxy = proxy_factory(upstream.url, env=proxy_env(nothing_listens, no_proxy="127.0.0.1"))
    await pull(proxy, image)
    assert upstream.requests and not any(via_proxy(r) for r in upstream.requests)


async def test_redirect_to_a_cdn_behind_the_proxy(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    http_proxy: HttpProxy,
) -> None:
    """The registry is in NO_PROXY, the CDN it redirects blobs to is not: only the CDN's
    requests go through the proxy."""
    image = image_of(registry, "library/cdnproxy")
    digest = image.child("linux/amd64").layers[0]
    cdn = front(registry)
    cdn_base = cdn.url.replace("127.0.0.1", "localhost")
    upstream = front(registry)
    upstream.add_fault(blob_get(digest), RedirectTo(cdn_base), times=100)
    proxy = proxy_factory(upstream.url, env=proxy_env(http_proxy.url, no_proxy="127.0.0.1"))

    status, _, body = await fetch(f"{proxy.url}/v2/library/cdnproxy/blobs/{digest}")
    assert status == 200 and body == image.blobs[digest]
    assert cdn.count("GET", f"/blobs/{digest}") == 1
    assert all(via_proxy(r) for r in cdn.requests)
    assert upstream.requests and not any(via_proxy(r) for r in upstream.requests)
    assert http_proxy.requests() == [f"GET {cdn_base}/v2/library/cdnproxy/blobs/{digest}"]


async def test_token_service_through_an_authenticating_proxy(
    token_registry: TokenRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    """Docker Hub's flow (a 401, a token from the realm, the pull) through a proxy that wants
    credentials, given in its URL as ``http://user:password@host:port``."""
    http_proxy = HttpProxy(tmp_path / "authproxy", user="corp", password="s3cret").start()
    try:
        upstream = front(token_registry.registry)
        with_credentials = http_proxy.url.replace("http://", "http://corp:s3cret@")
        proxy = proxy_factory(upstream.url, env=proxy_env(with_credentials))
        await pull(proxy, token_registry.image)
        asked = http_proxy.requests()
        realm = token_registry.issuer.realm
        assert any(a.startswith(f"GET {realm}") for a in asked), asked
        assert upstream.requests and all(via_proxy(r) for r in upstream.requests)
        assert any("Authorization" in r.headers for r in upstream.requests)
        assert "Proxy-Authorization" not in {h for r in upstream.requests for h in r.headers}
    finally:
        http_proxy.stop()
