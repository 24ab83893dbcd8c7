"""Tests of the test harness itself: real registry, real tokens, real images, real faults.

None of these needs the proxy. If one fails, every proxy test built on the harness is suspect.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import ssl
import sys
import tarfile
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
import pytest

from tests.harness import images as im
from tests.harness.front import (
    CutAfter,
    Drip,
    FlipByte,
    Front,
    RedirectTo,
    Stall,
    Status,
    WrongLength,
    any_request,
    blob,
    manifest,
    too_many_requests,
)
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry, start_registry
from tests.harness.tlsca import LocalCA
from tests.harness.tokens import TokenIssuer, TokenRegistry, parse_scope
from tests.harness.tools import free_port, require_tool, wait_http

ACCEPT_ALL = ", ".join(im.MANIFEST_TYPES)


class Answer:
    """Status, headers and body of one raw HTTP exchange (no redirects followed)."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def fetch(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 10,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """One request with http.client: nothing followed, nothing decompressed (https: *context*)."""
    parts = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, headers=dict(headers or {}))
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def get_token(issuer: TokenIssuer, scope: str, creds: tuple[str, str] | None = None) -> Answer:
    headers = {}
    if creds:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(creds).encode()).decode()
    query = urllib.parse.urlencode({"service": issuer.service, "scope": scope})
    return fetch(f"{issuer.realm}?{query}", headers=headers)


def bearer(answer: Answer) -> dict[str, str]:
    return {"Authorization": f"Bearer {json.loads(answer.body)['token']}"}


def blob_url(base: str, repository: str, digest: str) -> str:
    return f"{base}/v2/{repository}/blobs/{digest}"


def manifest_url(base: str, repository: str, ref: str) -> str:
    return f"{base}/v2/{repository}/manifests/{ref}"


def first_layer(image: im.SeededImage) -> tuple[str, bytes]:
    digest = next(iter(image.children.values())).layers[0]
    return digest, image.blobs[digest]


# -- seeded images ----------------------------------------------------------------------------


def test_seeded_index_is_byte_exact(seeded_registry: im.SeededRegistry) -> None:
    image = seeded_registry.images["library/alpine:3.19"]
    assert im.inspect_raw(seeded_registry.registry, "library/alpine:3.19") == image.raw
    answer = fetch(
        manifest_url(seeded_registry.url, image.repository, image.tag),
        headers={"Accept": ACCEPT_ALL},
    )
    assert answer.status == 200
    assert answer.body == image.raw
    assert answer.headers["Content-Type"] == im.OCI_INDEX
    assert answer.headers["Docker-Content-Digest"] == image.digest == im.sha256_digest(answer.body)
    index = json.loads(image.raw)
    platforms = [
        "/".join(
            filter(
                None,
                (m["platform"]["os"], m["platform"]["architecture"], m["platform"].get("variant")),
            )
        )
        for m in index["manifests"]
    ]
    assert platforms == ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]

    head = fetch(
        manifest_url(seeded_registry.url, image.repository, image.tag),
        "HEAD",
        {"Accept": ACCEPT_ALL},
    )
    assert head.status == 200
    assert head.body == b""
    assert head.headers["Content-Length"] == str(len(image.raw))
    assert head.headers["Docker-Content-Digest"] == image.digest

    for child in image.children.values():
        answer = fetch(
            manifest_url(seeded_registry.url, image.repository, child.digest),
            headers={"Accept": ACCEPT_ALL},
        )
        assert (answer.status, answer.body) == (200, child.raw)
        assert answer.headers["Content-Type"] == im.OCI_MANIFEST
    for digest, data in image.blobs.items():
        answer = fetch(blob_url(seeded_registry.url, image.repository, digest))
        assert answer.status == 200
        assert answer.body == data
        assert answer.headers["Docker-Content-Digest"] == digest


def test_layers_are_real_tars_with_matching_diff_ids(seeded_registry: im.SeededRegistry) -> None:
    image = seeded_registry.images["library/redis:7"]
    for platform, child in image.children.items():
        config = json.loads(image.blobs[child.config_digest])
        spec = platform.split("/")
        assert [config["os"], config["architecture"], config.get("variant")][: len(spec)] == spec
        diff_ids = []
        for digest in child.layers:
            plain = gzip.decompress(image.blobs[digest])
            diff_ids.append(im.sha256_digest(plain))
            with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
                assert tar.getnames()
        assert config["rootfs"]["diff_ids"] == diff_ids
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(image.blobs[child.layers[0]]))) as tar:
            marker = tar.extractfile("etc/regproxy-test")
            assert marker is not None
            assert f"platform={platform}" in marker.read().decode()
        # Requested sizes are approximate compressed sizes.
        assert 60 * 1024 < len(image.blobs[child.layers[0]]) < 68 * 1024


def test_docker_format_keeps_docker_media_types(seeded_registry: im.SeededRegistry) -> None:
    image = seeded_registry.images["library/busybox:1.36"]
    assert image.media_type == im.DOCKER_LIST
    answer = fetch(
        manifest_url(seeded_registry.url, image.repository, image.tag),
        headers={"Accept": ACCEPT_ALL},
    )
    assert answer.body == image.raw
    assert answer.headers["Content-Type"] == im.DOCKER_LIST
    assert answer.headers["Docker-Content-Digest"] == image.digest
    for child in image.children.values():
        answer = fetch(
            manifest_url(seeded_registry.url, image.repository, child.digest),
            headers={"Accept": ACCEPT_ALL},
        )
        assert answer.body == child.raw
        assert answer.headers["Content-Type"] == im.DOCKER_MANIFEST
        doc = json.loads(answer.body)
        assert doc["config"]["mediaType"] == im.DOCKER_CONFIG
        assert {layer["mediaType"] for layer in doc["layers"]} == {im.DOCKER_LAYER}


def test_other_seeded_shapes(seeded_registry: im.SeededRegistry) -> None:
    hello = seeded_registry.images["library/hello:latest"]
    assert hello.single and hello.media_type == im.OCI_MANIFEST
    assert list(hello.children) == ["linux/amd64"]
    assert hello.child("linux/amd64").digest == hello.digest
    answer = fetch(
        manifest_url(seeded_registry.url, "library/hello", "latest"),
        headers={"Accept": ACCEPT_ALL},
    )
    assert answer.headers["Content-Type"] == im.OCI_MANIFEST and answer.body == hello.raw

    mysql = seeded_registry.images["library/mysql:5.7"]
    assert [m["platform"]["architecture"] for m in json.loads(mysql.raw)["manifests"]] == ["amd64"]
    server = seeded_registry.images["mysql/mysql-server:5.7"]
    assert server.media_type == im.DOCKER_LIST and list(server.children) == ["linux/arm64/v8"]
    for tag, platform in (("1.0-amd64", "linux/amd64"), ("1.0-arm64", "linux/arm64/v8")):
        app = seeded_registry.images[f"myteam/app:{tag}"]
        assert app.single and list(app.children) == [platform]
        assert im.inspect_raw(seeded_registry.registry, f"myteam/app:{tag}") == app.raw

    redis = seeded_registry.images["library/redis:7"]
    entries = json.loads(redis.raw)["manifests"]
    attestations = [e for e in entries if e["platform"]["os"] == "unknown"]
    assert len(attestations) == 2
    for entry in attestations:
        assert entry["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert entry["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
        attested = entry["annotations"]["vnd.docker.reference.digest"]
        assert attested in {c.digest for c in redis.children.values()}
    for att in redis.attestations.values():
        answer = fetch(
            manifest_url(seeded_registry.url, "library/redis", att.digest),
            headers={"Accept": ACCEPT_ALL},
        )
        assert answer.body == att.raw


def test_tag_image_copies_unchanged(registry: Registry) -> None:
    image = im.seed_image(registry, "library/tagme", "1", fmt="docker")
    copy = im.tag_image(registry, image, "2")
    other = im.tag_image(registry, image, "x", repository="other/tagme")
    assert copy.digest == other.digest == image.digest
    for repository, tag in (("library/tagme", "2"), ("other/tagme", "x")):
        answer = fetch(manifest_url(registry.url, repository, tag), headers={"Accept": ACCEPT_ALL})
        assert answer.body == image.raw
        assert answer.headers["Content-Type"] == im.DOCKER_LIST
    digest, data = first_layer(image)
    assert fetch(blob_url(registry.url, "other/tagme", digest)).body == data


def test_every_seed_is_unique(registry: Registry) -> None:
    a = im.build_image("r", "t")
    b = im.build_image("r", "t")
    assert a.digest != b.digest
    assert not set(a.blobs) & set(b.blobs)
    with pytest.raises(ValueError, match="attestation"):
        im.build_image("r", "t", fmt="docker", attestation=True)


def test_registry_restarts_on_same_port_with_its_data(registry: Registry) -> None:
    image = im.seed_image(registry, "library/keep", "1", single=True, platforms=("linux/amd64",))
    port = registry.port
    registry.stop()
    with pytest.raises(OSError):
        fetch(f"{registry.url}/v2/", timeout=2)
    registry.start()
    assert registry.port == port
    answer = fetch(manifest_url(registry.url, "library/keep", "1"), headers={"Accept": ACCEPT_ALL})
    assert answer.body == image.raw


def test_htpasswd_registry(tmp_path: Path) -> None:
    with start_registry(tmp_path / "basic", htpasswd=("bob", "hunter2")) as reg:
        answer = fetch(f"{reg.url}/v2/")
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Basic ")
        image = im.seed_image(reg, "team/private", "1")  # creds default to the htpasswd pair
        auth = "Basic " + base64.b64encode(b"bob:hunter2").decode()
        answer = fetch(
            manifest_url(reg.url, "team/private", "1"),
            headers={"Accept": ACCEPT_ALL, "Authorization": auth},
        )
        assert answer.body == image.raw


# -- token auth ------------------------------------------------------------------------------


def test_token_flow(token_registry: TokenRegistry) -> None:
    issuer, image = token_registry.issuer, token_registry.image
    url = manifest_url(token_registry.url, image.repository, image.tag)
    challenge = fetch(url, headers={"Accept": ACCEPT_ALL})
    assert challenge.status == 401
    www = challenge.headers["WWW-Authenticate"]
    assert www.startswith("Bearer ")
    assert f'realm="{issuer.realm}"' in www and f'service="{issuer.service}"' in www
    assert 'scope="repository:library/alpine:pull"' in www
    assert issuer.realm.startswith("http://127.0.0.1:")

    token = get_token(issuer, "repository:library/alpine:pull")
    assert token.status == 200
    body = json.loads(token.body)
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    answer = fetch(url, headers={"Accept": ACCEPT_ALL, **bearer(token)})
    assert (answer.status, answer.body) == (200, image.raw)
    assert issuer.issued == [(("repository:library/alpine:pull",), None)]

    # Anonymous clients get pull only: a push token is useless for them.
    anon_push = get_token(issuer, "repository:library/alpine:pull,push")
    start = fetch(
        f"{token_registry.url}/v2/library/alpine/blobs/uploads/", "POST", bearer(anon_push)
    )
    assert start.status == 401
    user_push = get_token(issuer, "repository:library/alpine:pull,push", token_registry.creds)
    start = fetch(
        f"{token_registry.url}/v2/library/alpine/blobs/uploads/", "POST", bearer(user_push)
    )
    assert start.status == 202
    assert issuer.count(username="alice") == 1
    assert issuer.count(scope_contains="push") == 2

    assert get_token(issuer, "repository:library/alpine:pull", ("alice", "wrong")).status == 401
    assert issuer.refused == 1
    # Anonymous skopeo pull works end to end.
    assert im.inspect_raw(token_registry.registry, "library/alpine:3.19") == image.raw


def test_registry_rejects_tokens_from_another_key(token_registry: TokenRegistry) -> None:
    impostor = TokenIssuer(service=token_registry.issuer.service)  # same names, other key
    token = impostor.make_token(["repository:library/alpine:pull"])
    image = token_registry.image
    answer = fetch(
        manifest_url(token_registry.url, image.repository, image.tag),
        headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {token}"},
    )
    assert answer.status == 401
    good = token_registry.issuer.make_token(["repository:library/alpine:pull"])
    answer = fetch(
        manifest_url(token_registry.url, image.repository, image.tag),
        headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {good}"},
    )
    assert answer.status == 200


def test_issuer_policies() -> None:
    assert parse_scope("repository:127.0.0.1:5000/a/b:pull,push") == (
        "repository",
        "127.0.0.1:5000/a/b",
        ["pull", "push"],
    )
    with TokenIssuer(
        users={"u": "p"}, anonymous=False, private_repositories={"x/y"}, expires_in=None
    ) as issuer:
        assert get_token(issuer, "repository:a/b:pull").status == 401
        answer = get_token(issuer, "repository:a/b:pull", ("u", "p"))
        assert answer.status == 200 and "expires_in" not in json.loads(answer.body)
    with TokenIssuer(private_repositories={"x/y"}) as issuer:
        import jwt

        token = json.loads(get_token(issuer, "repository:x/y:pull").body)["token"]
        assert jwt.decode(token, options={"verify_signature": False})["access"] == []


async def test_issuer_and_front_work_from_async_tests(
    token_registry: TokenRegistry, front: Callable[..., Front]
) -> None:
    proxy = front(token_registry.registry)
    image = token_registry.image
    async with aiohttp.ClientSession() as session:
        url = manifest_url(proxy.url, image.repository, image.tag)
        async with session.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
            assert resp.status == 401
            # The challenge passes the front unmodified: realm is still the issuer.
            assert f'realm="{token_registry.issuer.realm}"' in resp.headers["WWW-Authenticate"]
        params = {
            "service": token_registry.issuer.service,
            "scope": "repository:library/alpine:pull",
        }
        async with session.get(token_registry.issuer.realm, params=params) as resp:
            token = (await resp.json())["token"]
        headers = {"Accept": ACCEPT_ALL, "Authorization": f"Bearer {token}"}
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.read() == image.raw
    assert proxy.count("GET", "/manifests/") == 2
    assert token_registry.issuer.count() == 1


# -- the front -------------------------------------------------------------------------------


def test_front_forwards_and_records(
    seeded_registry: im.SeededRegistry, front: Callable[..., Front]
) -> None:
    proxy = front(seeded_registry.registry)
    image = seeded_registry.images["library/alpine:3.19"]
    url = manifest_url(proxy.url, image.repository, image.tag) + "?ns=docker.io"
    answer = fetch(url, headers={"Accept": ACCEPT_ALL, "User-Agent": "test-agent/1"})
    assert answer.body == image.raw
    assert answer.headers["Content-Type"] == im.OCI_INDEX
    assert answer.headers["Docker-Content-Digest"] == image.digest
    head = fetch(url, "HEAD", {"Accept": ACCEPT_ALL})
    assert head.headers["Content-Length"] == str(len(image.raw)) and head.body == b""

    digest, data = first_layer(image)
    ranged = fetch(blob_url(proxy.url, image.repository, digest), headers={"Range": "bytes=10-19"})
    assert ranged.status == 206
    assert ranged.body == data[10:20]
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(data)}"

    reqs = proxy.requests
    assert [(r.method, r.status) for r in reqs] == [("GET", 200), ("HEAD", 200), ("GET", 206)]
    assert reqs[0].query == "ns=docker.io"
    assert reqs[0].path == "/v2/library/alpine/manifests/3.19"
    assert reqs[0].headers["User-Agent"] == "test-agent/1"
    assert (
        proxy.count() == 3
        and proxy.count("HEAD") == 1
        and proxy.count(path_contains="/blobs/") == 1
    )
    proxy.reset()
    assert proxy.count() == 0

    # Upstream down: the front says 502 instead of hanging.
    dead = front(f"http://127.0.0.1:{free_port()}")
    assert fetch(f"{dead.url}/v2/").status == 502


def test_front_serves_tls_before_a_plain_registry(
    seeded_registry: im.SeededRegistry, front: Callable[..., Front], local_ca: LocalCA
) -> None:
    proxy = front(seeded_registry.registry, ssl_context=local_ca.server_context())
    assert proxy.url.startswith("https://127.0.0.1:") and proxy.upstream.startswith("http://")
    image = seeded_registry.images["library/alpine:3.19"]
    digest, data = first_layer(image)
    context = local_ca.client_context()
    url = manifest_url(proxy.url, image.repository, image.tag)
    assert fetch(url, headers={"Accept": ACCEPT_ALL}, context=context).body == image.raw
    assert fetch(blob_url(proxy.url, image.repository, digest), context=context).body == data
    assert [(r.method, r.status) for r in proxy.requests] == [("GET", 200), ("GET", 200)]
    # a client that does not trust the CA is refused before any request is made
    with pytest.raises(ssl.SSLCertVerificationError):
        fetch(url, context=ssl.create_default_context())
    assert proxy.count() == 2


def test_front_passes_uploads_and_restarts(registry: Registry, front: Callable[..., Front]) -> None:
    proxy = front(registry)
    # A full skopeo push (POST, chunked PATCH, PUT, manifest PUT) through the front, then read back.
    image = im.seed_image(proxy, "library/upload", "1", layer_sizes=(300_000,))
    assert proxy.count("PUT", "/manifests/") == 3
    assert proxy.count("PATCH") >= 2
    digest, data = first_layer(image)
    assert fetch(blob_url(registry.url, "library/upload", digest)).body == data
    url = proxy.url
    proxy.stop()
    with pytest.raises(OSError):
        fetch(f"{url}/v2/", timeout=2)
    proxy.start()
    assert proxy.url == url
    assert fetch(blob_url(url, "library/upload", digest)).body == data


def test_fault_cut_after(seeded_registry: im.SeededRegistry, front: Callable[..., Front]) -> None:
    proxy = front(seeded_registry.registry)
    image = seeded_registry.images["library/redis:7"]
    digest, data = first_layer(image)
    rule = proxy.add_fault(blob(digest), CutAfter(1000))
    url = blob_url(proxy.url, image.repository, digest)
    assert fetch(url, "HEAD").status == 200  # HEAD does not use up a body fault
    with pytest.raises(http.client.IncompleteRead) as info:
        fetch(url)
    assert len(info.value.partial) == 1000
    assert info.value.expected == len(data) - 1000  # the real Content-Length was announced
    assert rule.applied == 1
    assert fetch(url).body == data  # times=1: the next one is clean
    assert [r.fault for r in proxy.requests] == [None, "CutAfter", None]


def test_fault_flip_byte_and_wrong_length(
    seeded_registry: im.SeededRegistry, front: Callable[..., Front]
) -> None:
    proxy = front(seeded_registry.registry)
    image = seeded_registry.images["library/alpine:3.19"]
    digest, data = first_layer(image)
    url = blob_url(proxy.url, image.repository, digest)

    proxy.add_fault(blob(digest), FlipByte(5), times=2)
    for _ in range(2):
        flipped = fetch(url).body
        assert len(flipped) == len(data)
        assert im.sha256_digest(flipped) != digest
        assert flipped[5] == data[5] ^ 0xFF and flipped[:5] == data[:5]
    assert fetch(url).body == data

    proxy.add_fault(blob(digest), WrongLength(+10))
    with pytest.raises(http.client.IncompleteRead) as info:
        fetch(url)
    assert info.value.partial == data and info.value.expected == 10

    proxy.add_fault(blob(digest), WrongLength(-10))
    short = fetch(url)
    assert short.headers["Content-Length"] == str(len(data) - 10)
    assert short.body == data[:-10]


def test_fault_status_stall_drip(
    seeded_registry: im.SeededRegistry, front: Callable[..., Front]
) -> None:
    proxy = front(seeded_registry.registry)
    image = seeded_registry.images["library/alpine:3.19"]
    url = manifest_url(proxy.url, image.repository, image.tag)

    proxy.add_fault(manifest("3.19"), too_many_requests(retry_after=30), times=2)
    limited = fetch(url, headers={"Accept": ACCEPT_ALL})
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "30"
    error = json.loads(limited.body)["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS" and "pull rate limit" in error["message"]
    head = fetch(url, "HEAD", {"Accept": ACCEPT_ALL})  # Status applies to HEAD too
    assert head.status == 429 and head.body == b""
    assert fetch(url, headers={"Accept": ACCEPT_ALL}).status == 200

    proxy.add_fault(any_request, Status(503, {"X-Why": "test"}))
    down = fetch(f"{proxy.url}/v2/")
    assert down.status == 503 and down.headers["X-Why"] == "test"
    assert proxy.count(path_contains="/manifests/") == 3  # faulted requests are recorded too

    proxy.add_fault(manifest(image.digest), Stall(0.5))
    started = time.monotonic()
    assert (
        fetch(
            manifest_url(proxy.url, image.repository, image.digest), headers={"Accept": ACCEPT_ALL}
        ).body
        == image.raw
    )
    assert time.monotonic() - started >= 0.5

    digest, data = first_layer(image)  # ~2 KiB
    proxy.add_fault(blob(digest), Drip(4096))
    started = time.monotonic()
    assert fetch(blob_url(proxy.url, image.repository, digest)).body == data
    assert time.monotonic() - started >= 0.3


def test_fault_redirect_to_cdn(token_registry: TokenRegistry, front: Callable[..., Front]) -> None:
    cdn = front(token_registry.registry)
    proxy = front(token_registry.registry)
    image = token_registry.image
    digest, data = first_layer(image)
    rule = proxy.add_fault(blob(digest), RedirectTo(cdn), times=2)
    url = blob_url(proxy.url, image.repository, digest)

    # Unauthenticated: the registry's 401 comes back and does not use up the rule.
    assert fetch(url).status == 401
    assert rule.applied == 0

    auth = bearer(get_token(token_registry.issuer, "repository:library/alpine:pull"))
    redirect = fetch(url, headers=auth)
    assert redirect.status == 307
    location = redirect.headers["Location"]
    assert location.startswith(f"{cdn.url}/_cdn/") and location.endswith(f"/blobs/{digest}")
    # A well-behaved client follows without the registry token; the CDN serves anyway.
    served = fetch(location)
    assert (served.status, served.body) == (200, data)
    assert "Docker-Content-Digest" not in served.headers
    ranged = fetch(location, headers={"Range": "bytes=0-9"})
    assert (ranged.status, ranged.body) == (206, data[:10])
    assert cdn.saw_authorization is False
    fetch(location, headers=auth)
    assert cdn.saw_authorization is True
    assert cdn.count("GET", "/_cdn/") == 3

    # Plain URL target: Location is that base + the original path.
    proxy.add_fault(blob(digest), RedirectTo("http://cdn.invalid"), times=1)
    fetch(url, headers=auth)  # the remaining RedirectTo(cdn) use
    assert (
        fetch(url, headers=auth).headers["Location"]
        == f"http://cdn.invalid{urllib.parse.urlsplit(url).path}"
    )


# -- tools and the proxy process -------------------------------------------------------------


def test_require_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("skopeo").endswith("/skopeo")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool("no-such-tool-regproxy")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_tool("no-such-tool-regproxy")


def test_wait_http_is_bounded() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.5)
    assert time.monotonic() - started < 3


DUMMY_PROXY = textwrap.dedent(
    """
    import argparse, http.server, signal, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("cmd")
    parser.add_argument("--listen")
    parser.add_argument("--upstream")
    parser.add_argument("--storage")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--exit", type=int)
    args = parser.parse_args()
    if args.exit is not None:
        print("dummy: failing on purpose", flush=True)
        sys.exit(args.exit)
    host, port = args.listen.rsplit(":", 1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(args.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print(f"dummy: serving {args.listen} upstream={args.upstream} storage={args.storage}",
          flush=True)
    http.server.HTTPServer((host, int(port)), Handler).serve_forever()
    """
)


def test_proxy_process_lifecycle(
    tmp_path: Path, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    script = tmp_path / "dummy_proxy.py"
    script.write_text(DUMMY_PROXY)
    base = (sys.executable, str(script))
    proc = proxy_factory("http://127.0.0.1:1", base_command=base)
    assert fetch(f"{proc.url}/v2/").status == 200
    assert proc.storage.is_dir()
    port, pid = proc.port, proc.pid
    proc.restart()
    assert proc.port == port and proc.pid != pid
    proc.kill9()
    assert not proc.running
    proc.start()
    assert fetch(f"{proc.url}/v2/").status == 200
    assert proc.stop() == 0
    assert proc.logs().count("dummy: serving") == 3
    assert "upstream=http://127.0.0.1:1" in proc.logs()

    crashing = ProxyProcess(
        "http://x", tmp_path / "s2", base_command=base, extra_args=["--exit", "3"]
    )
    with pytest.raises(pytest.fail.Exception, match=r"exited with 3(.|\n)*failing on purpose"):
        crashing.start()
    unhealthy = ProxyProcess(
        "http://x",
        tmp_path / "s3",
        base_command=base,
        extra_args=["--status", "503"],
        start_timeout=0.5,
    )
    with pytest.raises(pytest.fail.Exception, match=r"not ready within 0\.5s \(status 503\)"):
        unhealthy.start()
    assert not unhealthy.running


def test_sha256_digest_helper() -> None:
    assert im.sha256_digest(b"") == "sha256:" + hashlib.sha256(b"").hexdigest()
