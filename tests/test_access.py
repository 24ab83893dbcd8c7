"""Many upstreams, client authentication, private content that stays private, TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import jwt
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
#: The token signing key of write_access_config (what a chart's Secret would hold).
TOKEN_KEY = "0123456789abcdef0123456789abcdef-test-key"


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
    anonymous may pull docker.io/library/* and ghcr.io/*, alice everything, bob docker.io/*;
    tokens signed with ``TOKEN_KEY``."""
    password_file = directory / "corp-password"
    password_file.write_text(CORP_CREDS[1])
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u, p in USERS.items()
        )
    )
    key_file = directory / "token-signing-key"
    key_file.write_text(TOKEN_KEY)
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
  token: {{signing_key_file: "{key_file}"}}
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
    realm = f"http://127.0.0.1:{setup.proxy.port}/token"
    assert headers["WWW-Authenticate"] == f'Bearer realm="{realm}",service="regproxy"'
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


# -- the Bearer token service ----------------------------------------------------------------------


async def token(
    proxy: ProxyProcess,
    *scopes: str,
    headers: dict[str, str] | None = None,
    query: str = "service=regproxy",
) -> tuple[int, dict[str, Any]]:
    """``GET /token?service=regproxy&scope=...``: status and the JSON answer."""
    q = query + "".join(f"&scope={s}" for s in scopes)
    status, _, body = await fetch(f"{proxy.url}/token?{q}", headers=headers)
    return status, json.loads(body)


def claims(answer: dict[str, Any]) -> dict[str, Any]:
    """The token's claims, checked against the signing key the config holds."""
    assert answer["token"] == answer["access_token"]
    return jwt.decode(answer["token"], TOKEN_KEY, algorithms=["HS256"], audience="regproxy")


def pulls(answer: dict[str, Any]) -> set[str]:
    return {a["name"] for a in claims(answer)["access"] if a["actions"] == ["pull"]}


def bearer(answer: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {answer['token']}"}


async def test_tokens_carry_only_the_scopes_the_rules_allow(setup: Setup) -> None:
    proxy = setup.proxy
    asked = ("repository:library/alpine:pull", "repository:corp/team/secret:pull,push")
    status, anonymous = await token(proxy, *asked)
    assert status == 200 and 60 <= anonymous["expires_in"] <= 3600
    assert claims(anonymous)["sub"] == ""
    assert pulls(anonymous) == {"library/alpine"}
    status, alice = await token(proxy, *asked, headers=basic("alice", "alice-pw"))
    assert status == 200 and claims(alice)["sub"] == "alice"
    assert pulls(alice) == {"library/alpine", "corp/team/secret"}  # pull only: read-only proxy
    status, bob = await token(proxy, *asked, headers=basic("bob", "bob-pw"))
    assert pulls(bob) == {"library/alpine"}
    # the Docker Hub login dockerd sends to every mirror: anonymous, not an error
    status, hub = await token(proxy, *asked, headers=basic("dockerhub-user", "dckr_pat_X"))
    assert status == 200 and claims(hub)["sub"] == "" and pulls(hub) == {"library/alpine"}
    # POST: the OAuth2 password grant containerd uses when it has credentials
    form = "grant_type=password&username=alice&password=alice-pw&service=regproxy"
    form += "&client_id=containerd-client&scope=repository:corp/team/secret:pull"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/token",
            data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp,
    ):
        assert resp.status == 200
        posted = await resp.json()
    assert pulls({**posted, "token": posted["access_token"]}) == {"corp/team/secret"}


async def test_token_logins_fail_with_wrong_credentials(setup: Setup) -> None:
    proxy = setup.proxy
    # what docker login / podman login send: no scope
    login = "service=regproxy&account=alice&client_id=docker&offline_token=true"
    assert (await token(proxy, query=login, headers=basic("alice", "alice-pw")))[0] == 200
    for creds in (("alice", "wrong"), ("nobody", "x"), ("alice", "")):
        status, body = await token(proxy, query=login, headers=basic(*creds))
        assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED", creds
        assert "token" not in body
    # a known user's wrong password is refused also when scopes are asked for
    status, _ = await token(proxy, "repository:library/alpine:pull", headers=basic("bob", "x"))
    assert status == 401
    form = "grant_type=password&username=alice&password=wrong&scope=repository:x/y:pull"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/token", data=form) as resp:
            assert resp.status == 401
        async with session.post(f"{proxy.url}/token", data="grant_type=refresh_token") as resp:
            assert resp.status == 400


async def test_private_content_needs_a_token_with_its_scope(setup: Setup) -> None:
    url, proxy = setup.proxy.url, setup.proxy
    secret = setup.images["corp"]
    child = secret.child("linux/amd64")
    scope = "repository:corp/team/secret:pull"
    _, alice = await token(proxy, scope, headers=basic("alice", "alice-pw"))
    # alice pulls it: manifest and layer are now cached
    status, _, body = await fetch(f"{url}/v2/corp/team/secret/manifests/1", headers=bearer(alice))
    assert (status, body) == (200, secret.raw)
    layer = child.layers[0]
    status, _, body = await fetch(f"{url}/v2/corp/team/secret/blobs/{layer}", headers=bearer(alice))
    assert (status, body) == (200, secret.blobs[layer])
    corp_before = setup.corp.count()

    _, anonymous = await token(proxy, scope)
    _, bob = await token(proxy, scope, headers=basic("bob", "bob-pw"))
    _, alpine_only = await token(
        proxy, "repository:library/alpine:pull", headers=basic("alice", "alice-pw")
    )
    for path in (
        "/v2/corp/team/secret/manifests/1",
        f"/v2/corp/team/secret/manifests/{secret.digest}",
        f"/v2/corp/team/secret/blobs/{layer}",
        "/v2/corp/team/nothing/manifests/1",
    ):
        for method in ("GET", "HEAD"):
            for who, answer, expect in (
                ("anonymous", anonymous, 401),
                ("bob", bob, 403),
                ("alice, another scope", alpine_only, 401),
            ):
                status, headers, body = await fetch(url + path, method, headers=bearer(answer))
                assert status == expect, (who, method, path)
                assert "Docker-Content-Digest" not in headers
                assert secret.blobs[layer] not in body and secret.raw not in body
                assert secret.digest[7:] not in body.decode()
                if expect == 401:
                    www = headers["WWW-Authenticate"]
                    assert www.startswith('Bearer realm="http://127.0.0.1:')
                    assert f'scope="{scope}"' in www or "corp/team/nothing" in www
                    assert 'error="insufficient_scope"' in www
                if method == "GET":
                    code = json.loads(body)["errors"][0]["code"]
                    assert code == ("DENIED" if expect == 403 else "UNAUTHORIZED")
    assert setup.corp.count() == corp_before, "a refused request reached the private upstream"
    # the public repository with the anonymous token: fine
    _, public = await token(proxy, "repository:library/alpine:pull")
    status, _, body = await fetch(f"{url}/v2/library/alpine/manifests/3", headers=bearer(public))
    assert (status, body) == (200, setup.images["hub"].raw)


async def test_forged_and_expired_tokens_are_refused(setup: Setup) -> None:
    url = setup.proxy.url
    now = int(time.time())
    good = {
        "iss": "regproxy",
        "sub": "alice",
        "aud": "regproxy",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "corp/team/secret", "actions": ["pull"]}],
    }
    # a token made with the right key works: the checks below fail for their reason only
    made = jwt.encode(good, TOKEN_KEY, algorithm="HS256")
    path = f"{url}/v2/corp/team/secret/manifests/1"
    assert (await fetch(path, headers={"Authorization": f"Bearer {made}"}))[0] == 200
    unsigned = (
        base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(json.dumps(good).encode()).rstrip(b"=").decode()
        + "."
    )
    head, payload, signature = made.split(".")
    forged_payload = (
        base64.urlsafe_b64encode(json.dumps({**good, "sub": "root"}).encode()).rstrip(b"=").decode()
    )
    bad = {
        "other key": jwt.encode(good, "another-key-" + "x" * 40, algorithm="HS256"),
        "expired": jwt.encode(
            {**good, "iat": now - 900, "nbf": now - 900, "exp": now - 600}, TOKEN_KEY
        ),
        "other audience": jwt.encode({**good, "aud": "registry.docker.io"}, TOKEN_KEY),
        "alg none": unsigned,
        "tampered": f"{head}.{forged_payload}.{signature}",
        "garbage": "not-a-token",
    }
    for what, value in bad.items():
        for target in (path, f"{url}/v2/"):
            status, headers, body = await fetch(
                target, headers={"Authorization": f"Bearer {value}"}
            )
            assert status == 401, what
            assert 'error="invalid_token"' in headers["WWW-Authenticate"], what
            assert setup.images["corp"].raw not in body


async def test_tokens_verify_on_every_replica(
    setup: Setup, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A second replica with the same signing key honours the first one's tokens; one with
    another key does not (each would otherwise need its own login)."""
    config = tmp_path / "regproxy.yml"
    replica = proxy_factory(setup.hub.url, extra_args=["--config", str(config)])
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_config = write_access_config(other_dir, setup.hub.url, setup.ghcr.url, setup.corp.url)
    (other_dir / "token-signing-key").write_text("a-different-signing-key-" + "y" * 20)
    stranger = proxy_factory(setup.hub.url, extra_args=["--config", str(other_config)])
    _, alice = await token(
        setup.proxy, "repository:corp/team/secret:pull", headers=basic("alice", "alice-pw")
    )
    status, _, body = await fetch(
        f"{replica.url}/v2/corp/team/secret/manifests/1", headers=bearer(alice)
    )
    assert (status, body) == (200, setup.images["corp"].raw)
    status, _, _ = await fetch(
        f"{stranger.url}/v2/corp/team/secret/manifests/1", headers=bearer(alice)
    )
    assert status == 401


async def test_realm_follows_the_request_or_the_configuration(
    setup: Setup, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    url = f"{setup.proxy.url}/v2/"
    forwarded = {"Host": "regproxy.example:443", "X-Forwarded-Proto": "https"}
    _, headers, _ = await fetch(url, headers=forwarded)
    www = headers["WWW-Authenticate"]
    assert www == 'Bearer realm="https://regproxy.example:443/token",service="regproxy"'
    # a Host that would break out of the quoted realm is not echoed
    _, headers, _ = await fetch(url, headers={"Host": 'evil",x="1'})
    assert headers["WWW-Authenticate"].startswith('Bearer realm="http://localhost/token"')
    # configured: realm and service as written
    config = tmp_path / "regproxy.yml"
    text = config.read_text().replace(
        "token: {", 'token: {realm: "https://auth.example/token", service: "mirror.example", '
    )
    config.write_text(text)
    proxy = proxy_factory(setup.hub.url, extra_args=["--config", str(config)])
    _, headers, _ = await fetch(f"{proxy.url}/v2/")
    www = headers["WWW-Authenticate"]
    assert www == 'Bearer realm="https://auth.example/token",service="mirror.example"'
    _, answer = await token(proxy, "repository:library/alpine:pull")
    assert jwt.decode(answer["token"], TOKEN_KEY, algorithms=["HS256"], audience="mirror.example")[
        "access"
    ] == [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]


async def test_token_scopes_follow_containerd_ns_routing(setup: Setup) -> None:
    """containerd asks for ``repository:org/app:pull`` and then sends ``?ns=ghcr.io``: the name
    is granted (anonymous may pull ghcr.io/*), and checked again against the route taken."""
    url = setup.proxy.url
    _, anonymous = await token(setup.proxy, "repository:org/app:pull")
    assert pulls(anonymous) == {"org/app"}
    status, _, body = await fetch(
        f"{url}/v2/org/app/manifests/1?ns=ghcr.io", headers=bearer(anonymous)
    )
    assert (status, body) == (200, setup.images["ghcr"].raw)
    hub_before = setup.hub.count()
    for path in ("/v2/org/app/manifests/1", "/v2/org/app/manifests/1?ns=docker.io"):
        status, _, body = await fetch(url + path, headers=bearer(anonymous))
        assert status == 401 and setup.images["hub-app"].raw not in body
    assert setup.hub.count() == hub_before


async def test_a_removed_users_tokens_stop_working(setup: Setup, tmp_path: Path) -> None:
    scope = "repository:corp/team/secret:pull"
    _, alice = await token(setup.proxy, scope, headers=basic("alice", "alice-pw"))
    path = f"{setup.proxy.url}/v2/corp/team/secret/manifests/1"
    assert (await fetch(path, headers=bearer(alice)))[0] == 200
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(
            line for line in htpasswd.read_text().splitlines(True) if not line.startswith("alice:")
        )
    )
    setup.proxy.restart()  # the same signing key: alice's token still verifies, alice is gone
    status, headers, _ = await fetch(path, headers=bearer(alice))
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
