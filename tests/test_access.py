"""Many upstreams, client authentication, private content that stays private, TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme

from tests.harness.front import Front, too_many_requests
from tests.harness.images import SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry, start_registry
from tests.test_read_path import error_code, fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
CORP_CREDS = ("ci", "corp-secret-pw")
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Setup:
    hub: Front
    ghcr: Front
    corp: Front
    proxy: ProxyProcess
    images: dict[str, SeededImage]


def write_access_config(directory: Path, hub_url: str, ghcr_url: str, corp_url: str) -> Path:
    """regproxy's config for three upstreams (corp with credentials) and client access rules:
    anonymous may pull docker.io/library/* and ghcr.io/*, alice everything, bob docker.io/*."""
    password_file = directory / "corp-password"
    password_file.write_text(CORP_CREDS[1])
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u, p in USERS.items()
        )
    )
    config = directory / "regproxy.yml"
    config.write_text(
        f"""
upstreams:
  docker.io: {{url: "{hub_url}"}}
  ghcr.io: {{url: "{ghcr_url}"}}
  corp: {{url: "{corp_url}", username: {CORP_CREDS[0]}, password_file: "{password_file}"}}
default_upstream: docker.io
auth:
  htpasswd: "{htpasswd}"
  rules:
    - users: [anonymous]
      repositories: ["docker.io/library/*", "ghcr.io/*"]
    - users: [alice]
      repositories: ["*"]
    - users: [bob]
      repositories: ["docker.io/*"]
"""
    )
    return config


@pytest.fixture
def corp_registry(tmp_path: Path) -> Iterator[Registry]:
    """A private company registry: htpasswd auth, like ECR or a Harbor project."""
    reg = start_registry(tmp_path / "corp", htpasswd=CORP_CREDS)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def ghcr_registry(tmp_path: Path) -> Iterator[Registry]:
    """A second public registry, standing in for ghcr.io."""
    reg = start_registry(tmp_path / "ghcr")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def setup(
    registry: Registry,
    ghcr_registry: Registry,
    corp_registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> Setup:
    images = {
        "hub": seed_image(registry, "library/alpine", "3", platforms=("linux/amd64",)),
        "hub-app": seed_image(registry, "org/app", "1", platforms=("linux/amd64",), single=True),
        "ghcr": seed_image(ghcr_registry, "org/app", "1", platforms=("linux/amd64",), single=True),
        "ghcr-single": seed_image(
            ghcr_registry, "app", "1", platforms=("linux/amd64",), single=True
        ),
        "corp": seed_image(
            corp_registry,
            "team/secret",
            "1",
            platforms=("linux/amd64",),
            single=True,
            layer_sizes=(50_000,),
        ),
    }
    hub, ghcr, corp = front(registry), front(ghcr_registry), front(corp_registry)
    config = write_access_config(tmp_path, hub.url, ghcr.url, corp.url)
    proxy = proxy_factory(hub.url, extra_args=["--config", str(config)])
    return Setup(hub, ghcr, corp, proxy, images)


async def test_routing_by_ns_and_path_prefix(setup: Setup) -> None:
    url = setup.proxy.url
    hub, ghcr = setup.images["hub-app"], setup.images["ghcr"]
    alice = basic("alice", "alice-pw")
    # same repository and tag on two upstreams: namespaced, never mixed up
    assert (await fetch(f"{url}/v2/org/app/manifests/1", headers=alice))[2] == hub.raw
    assert (await fetch(f"{url}/v2/ghcr.io/org/app/manifests/1", headers=alice))[2] == ghcr.raw
    assert (await fetch(f"{url}/v2/org/app/manifests/1?ns=ghcr.io", headers=alice))[2] == ghcr.raw
    assert (await fetch(f"{url}/v2/org/app/manifests/1?ns=docker.io", headers=alice))[2] == hub.raw
    # library/ is Docker Hub's convention only
    single = setup.images["ghcr-single"]
    assert (await fetch(f"{url}/v2/ghcr.io/app/manifests/1", headers=alice))[2] == single.raw
    assert setup.ghcr.count(path_contains="/v2/app/manifests/1") >= 1
    for path in ("/v2/org/app/manifests/1?ns=quay.io", "/v2/quay.io/org/app/manifests/1"):
        status, _, body = await fetch(url + path, headers=alice)
        assert status == 404 and error_code(body) == "NAME_UNKNOWN"
        detail = json.loads(body)["errors"][0]["detail"]
        assert detail["upstreams"] == ["corp", "docker.io", "ghcr.io"]


async def test_client_login(setup: Setup) -> None:
    url = f"{setup.proxy.url}/v2/"
    status, headers, body = await fetch(url)
    assert status == 401 and error_code(body) == "UNAUTHORIZED"
    assert headers["WWW-Authenticate"] == 'Basic realm="regproxy"'
    assert (await fetch(url, headers=basic("alice", "alice-pw")))[0] == 200
    assert (await fetch(url, headers=basic("alice", "wrong")))[0] == 401
    assert (await fetch(url, headers=basic("nobody", "x")))[0] == 401


async def test_rules_allow_and_deny_without_leaking(setup: Setup) -> None:
    url = setup.proxy.url
    secret = setup.images["corp"]
    alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
    # anonymous: library/* and ghcr.io only
    assert (await fetch(f"{url}/v2/library/alpine/manifests/3"))[0] == 200
    assert (await fetch(f"{url}/v2/ghcr.io/org/app/manifests/1"))[0] == 200
    before = setup.corp.count()
    for path in (
        "/v2/corp/team/secret/manifests/1",
        f"/v2/corp/team/secret/manifests/{secret.digest}",
        f"/v2/corp/team/secret/blobs/{secret.child('linux/amd64').layers[0]}",
        "/v2/corp/team/nothing/manifests/1",
    ):
        for method in ("GET", "HEAD"):
            status, headers, body = await fetch(url + path, method)
            assert status == 401, path
            assert "Docker-Content-Digest" not in headers
            if method == "GET":
                assert error_code(body) == "UNAUTHORIZED"
                assert secret.digest[7:] not in body.decode()
    status, _, body = await fetch(f"{url}/v2/corp/team/secret/manifests/1", headers=bob)
    assert status == 403 and error_code(body) == "DENIED"
    assert setup.corp.count() == before, "a denied request reached the private upstream"
    # alice: everything, with the proxy's upstream credentials for corp
    status, headers, body = await fetch(f"{url}/v2/corp/team/secret/manifests/1", headers=alice)
    assert (status, body) == (200, secret.raw)
    assert any(r.headers.get("Authorization", "").startswith("Basic ") for r in setup.corp.requests)


async def test_private_blob_not_served_under_a_public_name(setup: Setup) -> None:
    url = setup.proxy.url
    secret = setup.images["corp"]
    child = secret.child("linux/amd64")
    alice = basic("alice", "alice-pw")
    # alice pulls the private image: now its layer is in the shared blob store
    for digest in (child.config_digest, *child.layers):
        status, _, data = await fetch(f"{url}/v2/corp/team/secret/blobs/{digest}", headers=alice)
        assert (status, data) == (200, secret.blobs[digest])
    # anonymous guesses the digest under a public repository: nothing
    for name in ("library/alpine", "ghcr.io/org/app"):
        for digest in (child.config_digest, *child.layers):
            status, headers, body = await fetch(f"{url}/v2/{name}/blobs/{digest}")
            assert status == 404 and error_code(body) == "BLOB_UNKNOWN"
            assert sha256(body) != digest
        status, _, body = await fetch(f"{url}/v2/{name}/manifests/{secret.digest}")
        assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    # and the other way: content of a public repository is served under it, to everyone
    hub = setup.images["hub"]
    hub_child = hub.child("linux/amd64")
    assert (await fetch(f"{url}/v2/library/alpine/manifests/3"))[2] == hub.raw
    assert (await fetch(f"{url}/v2/library/alpine/manifests/{hub_child.digest}"))[2] == (
        hub_child.raw
    )
    for digest in hub_child.layers:
        assert (await fetch(f"{url}/v2/library/alpine/blobs/{digest}"))[2] == hub.blobs[digest]


async def test_one_upstreams_trouble_does_not_slow_another(setup: Setup) -> None:
    url = setup.proxy.url
    setup.hub.add_fault(lambda r: True, too_many_requests(120), times=100)
    status, headers, _ = await fetch(f"{url}/v2/library/alpine/manifests/3")
    assert status == 429 and headers["Retry-After"] == "120"
    before = setup.hub.count()
    results = await asyncio.wait_for(
        asyncio.gather(*(fetch(f"{url}/v2/ghcr.io/org/app/manifests/1") for _ in range(5))),
        timeout=10,
    )
    assert all(status == 200 for status, _, _ in results)
    assert (await fetch(f"{url}/v2/library/alpine/manifests/3"))[0] == 429
    assert setup.hub.count() == before  # backing off: not asked again


async def test_credentials_never_leak(setup: Setup) -> None:
    url = setup.proxy.url
    alice = basic("alice", "alice-pw")
    hub_login = basic("dockerhub-user", "dckr_pat_SECRET123")  # what dockerd sends to mirrors
    await fetch(f"{url}/v2/corp/team/secret/manifests/1", headers=alice)
    await fetch(f"{url}/v2/corp/team/missing/manifests/1", headers=alice)
    await fetch(f"{url}/v2/library/alpine/manifests/3", headers=hub_login)
    bodies = b"".join(
        [
            (await fetch(f"{url}/metrics"))[2],
            (await fetch(f"{url}/v2/corp/team/x/manifests/1", headers=alice))[2],
        ]
    )
    logs = setup.proxy.logs()
    for secret in (CORP_CREDS[1], "alice-pw", "dckr_pat_SECRET123"):
        for form in (
            secret,
            base64.b64encode(secret.encode()).decode(),
            base64.b64encode(f"ci:{secret}".encode()).decode(),
        ):
            assert form not in logs
            assert form.encode() not in bodies
    # the client's Docker Hub login is not forwarded upstream
    assert not any(
        "ZG9ja2VyaHViLXVzZXI" in r.headers.get("Authorization", "") for r in setup.hub.requests
    )


async def test_tls(registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    image = seed_image(registry, "library/tls", "1", platforms=("linux/amd64",), single=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    proxy = proxy_factory(
        registry.url,
        extra_args=["--tls-cert", str(cert_file), "--tls-key", str(key_file)],
        scheme="https",
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"https://127.0.0.1:{proxy.port}/v2/library/tls/manifests/1"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as resp:
        assert resp.status == 200
        assert await resp.read() == image.raw
    # a client that does not trust the certificate is refused
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(url)
