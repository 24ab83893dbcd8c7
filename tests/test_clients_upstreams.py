"""Real clients through regproxy with several upstreams and client authentication (issue #8).

Topology (all on 127.0.0.1; one of each for the whole module)::

    ctr --hosts-dir (docker.io, ghcr.io) ─┐                  ┌─> Front ─> "hub"  (anonymous)
    skopeo docker://regproxy/<upstream>/… ├─> regproxy ──────┼─> Front ─> "ghcr" (anonymous)
    dockerd registry-mirrors = regproxy   │   upstreams:     └─> Front ─> "corp" (htpasswd:
    docker login / pull regproxy/corp/…  ─┘   docker.io,                   ci:corp-secret-pw)
                                              ghcr.io, corp
                                              auth: htpasswd (alice, bob) + rules

Rules: anonymous may pull ``docker.io/library/*`` and ``ghcr.io/*``; alice everything; bob
``docker.io/*``. regproxy logs in to corp with its own credentials. The same repository name
(``org/app:1``) exists with different content on hub and ghcr. The Fronts are never reset: their
request lists are the whole module's upstream traffic, so "this digest came from that upstream"
holds whatever order the tests run in (regproxy fetches each digest once, then serves its cache).

The module's dockerd has a Docker Hub login in its CLI config (``auths`` for
``https://index.docker.io/v1/``, a fake token), as a developer machine has.

What the clients do against regproxy's Bearer challenge (seen in regproxy's access log; dockerd
20.10.24, ctr 1.6.20, podman 4.3.1, skopeo 1.9.3):

* dockerd, mirror pull: ``GET /v2/`` without ``Authorization`` -> 401 ``Bearer
  realm="http://HOST/token",service="regproxy"``; then ``GET /token?scope=repository:library/
  alpine:pull&service=regproxy`` -- anonymously when it is logged in to nothing, with its *Docker
  Hub* login (Basic, ``account=hubuser``) when it has one; regproxy serves an unknown user asking
  for scopes as anonymous. Everything after that carries ``Authorization: Bearer``. Before the
  token service, a daemon without any login got a Basic challenge, logged "no basic auth
  credentials" and abandoned the mirror for Docker Hub.
* ``docker login HOST``: ``GET /v2/``, then ``GET /token?account=alice&client_id=docker&
  offline_token=true&service=regproxy`` with Basic credentials (no scope); a 401 there fails the
  login. ``docker pull HOST/corp/...`` then asks for a token with alice's credentials and the
  scope. Logged out, its anonymous token lacks the scope: ``insufficient_scope``, nothing served.
* ctr with hosts.toml mirrors: no ``/v2/`` ping, ``?ns=<registry host>`` on every request; on the
  Bearer challenge it fetches a token (anonymous ``GET``, or with ``--user`` first the OAuth2
  ``POST /token`` password grant) and retries; a token without the scope ends the pull with
  "insufficient_scope".
* skopeo / podman: ``GET /v2/``, then ``GET /token`` with the scope (Basic with ``--creds`` or
  after ``podman login``, which itself asks for a token without a scope).
"""

from __future__ import annotations

import base64
import http.client
import json
import platform
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.clients import (
    Dockerd,
    Podman,
    docker_cli,
    run,
    skopeo,
    write_hosts_toml,
)
from tests.harness.front import Front
from tests.harness.images import SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry, start_registry
from tests.test_access import CORP_CREDS, USERS, basic, write_access_config

pytestmark = pytest.mark.e2e

PULL_TIMEOUT = 120.0
#: The seeded images' only platform: the host's, so dockerd and ctr can pull them.
PLATFORM = {"x86_64": "linux/amd64", "aarch64": "linux/arm64/v8"}.get(platform.machine())
#: dockerd's own Docker Hub login (what ``docker login`` to Docker Hub leaves in config.json).
HUB_LOGIN = ("hubuser", "dckr_pat_FAKE0123456789abcdef")
ALICE = ("alice", USERS["alice"])
BOB = ("bob", USERS["bob"])


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    """The module's upstreams (behind counting Fronts), regproxy and the seeded images."""

    hub: Front
    ghcr: Front
    corp: Front
    proxy: ProxyProcess
    images: dict[str, SeededImage]
    empty_auth: Path
    #: Every response body and client output the tests saw (grepped for credentials).
    seen: list[str] = field(default_factory=list)

    @property
    def fronts(self) -> dict[str, Front]:
        return {"hub": self.hub, "ghcr": self.ghcr, "corp": self.corp}

    def keep(self, *texts: str | bytes | None) -> None:
        for text in texts:
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            if text:
                self.seen.append(text)

    def keep_run(
        self, result: subprocess.CompletedProcess[str]
    ) -> subprocess.CompletedProcess[str]:
        self.keep(result.stdout, result.stderr)
        return result


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if PLATFORM is None:
        pytest.skip(f"no seeded platform for host machine {platform.machine()!r}")
    base = tmp_path_factory.mktemp("upstreams")
    registries: list[Registry] = []
    fronts: list[Front] = []
    proxy: ProxyProcess | None = None
    try:
        hub = start_registry(base / "hub")
        registries.append(hub)
        ghcr = start_registry(base / "ghcr")
        registries.append(ghcr)
        corp = start_registry(base / "corp", htpasswd=CORP_CREDS)
        registries.append(corp)
        one = (PLATFORM,)
        images = {
            "alpine": seed_image(hub, "library/alpine", "3", platforms=one, single=True),
            "hub-app": seed_image(hub, "org/app", "1", platforms=one, single=True),
            "ghcr-app": seed_image(ghcr, "org/app", "1", platforms=one, single=True),
            "secret": seed_image(
                corp, "team/secret", "1", platforms=one, single=True, layer_sizes=(50_000,)
            ),
        }
        for reg in registries:
            fronts.append(Front(reg))
            fronts[-1].start()
        hub_front, ghcr_front, corp_front = fronts

        config = write_access_config(base, hub_front.url, ghcr_front.url, corp_front.url)
        empty_auth = base / "empty-auth.json"
        empty_auth.write_text('{"auths": {}}\n')
        proxy = ProxyProcess(
            hub_front.url,
            base / "storage",
            extra_args=["--config", str(config)],
            log_path=base / "regproxy.log",
        )
        proxy.start()
        yield Env(hub_front, ghcr_front, corp_front, proxy, images, empty_auth)
    finally:
        if proxy is not None:
            proxy.stop()
        for front in reversed(fronts):
            front.stop()
        for reg in reversed(registries):
            reg.stop()


def write_hub_login(d: Dockerd) -> None:
    """Give the docker CLI a Docker Hub login; it passes it to dockerd with every Hub pull."""
    assert d.base is not None
    (d.base / "cli" / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": b64(":".join(HUB_LOGIN))}}})
    )


@pytest.fixture(scope="module")
def dockerd(env: Env) -> Iterator[Dockerd]:
    with Dockerd([env.proxy.url]) as d:
        write_hub_login(d)
        yield d


@pytest.fixture
def docker(dockerd: Dockerd) -> Dockerd:
    """The module dockerd without images, so every pull goes to regproxy again."""
    dockerd.rmi_all()
    return dockerd


# --------------------------------------------------------------------------- helpers


_ACCESS = re.compile(
    r"request method=(?P<method>[A-Z]+) path=(?P<path>\S+) status=(?P<status>\d+) "
    r"bytes=\S+ duration=\S+ cache=(?P<cache>\S+)"
)


class ProxyLog:
    """regproxy's access lines from construction on: ``(method, path, status)``."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.mark = len(proxy.logs())

    def text(self) -> str:
        return self.proxy.logs()[self.mark :]

    def requests(self) -> list[tuple[str, str, int]]:
        return [(m["method"], m["path"], int(m["status"])) for m in _ACCESS.finditer(self.text())]


def request(
    env: Env,
    path: str,
    method: str = "GET",
    creds: tuple[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One plain HTTP request to regproxy; the body is kept for the credentials grep."""
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    if creds is not None:
        headers.update(basic(*creds))
    conn = http.client.HTTPConnection("127.0.0.1", env.proxy.port, timeout=30)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    env.keep(body)
    return resp.status, resp.headers, body


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def digests_of(image: SeededImage) -> set[str]:
    """The manifest, config and layer digests of a single-manifest image."""
    child = image.child(PLATFORM or "")
    return {image.digest, child.config_digest, *child.layers}


def fetched(front: Front, digests: set[str]) -> set[str]:
    """Which of ``digests`` this upstream served (a 200 GET ending in the digest)."""
    return {
        d
        for r in front.requests
        for d in digests
        if r.method == "GET" and r.status == 200 and r.path.endswith(f"/{d}")
    }


def assert_came_from(env: Env, name: str, image: SeededImage) -> None:
    """Every digest of ``image`` was fetched from upstream ``name``, under its repository,
    and no other upstream was ever asked for any of them."""
    wanted = digests_of(image)
    own = env.fronts[name]
    assert fetched(own, wanted) == wanted, [r.path for r in own.requests]
    repo = f"/v2/{image.repository}/"
    for r in own.requests:
        if any(d in r.path for d in wanted):
            assert r.path.startswith(repo) and not r.query, (r.method, r.path, r.query)
    for other, front in env.fronts.items():
        if other != name:
            served = [
                (r.method, r.path, r.status)
                for r in front.requests
                if any(d in r.path for d in wanted) and r.status != 404
            ]
            assert not served, f"{other} upstream answered for {name}'s content: {served}"


def skopeo_copy(
    env: Env, name: str, dest: Path, creds: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy --all docker://REGPROXY/<name> oci:DEST`` (no host credentials)."""
    args = [
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"--src-authfile={env.empty_auth}",
    ]
    if creds is not None:
        args.append(f"--src-creds={creds[0]}:{creds[1]}")
    result = skopeo(
        *args,
        f"docker://{env.proxy.host}/{name}",
        f"oci:{dest}",
        check=False,
        timeout=PULL_TIMEOUT,
    )
    return env.keep_run(result)


def skopeo_inspect_raw(
    env: Env, name: str, creds: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = ["inspect", "--raw", "--tls-verify=false", f"--authfile={env.empty_auth}"]
    if creds is not None:
        args.append(f"--creds={creds[0]}:{creds[1]}")
    return env.keep_run(skopeo(*args, f"docker://{env.proxy.host}/{name}", check=False))


def oci_layout(dest: Path) -> tuple[str, dict[str, bytes]]:
    """The top digest and every blob (digest -> bytes) of an OCI layout skopeo wrote."""
    (top,) = json.loads((dest / "index.json").read_text())["manifests"]
    blobs = {"sha256:" + f.name: f.read_bytes() for f in (dest / "blobs" / "sha256").iterdir()}
    return top["digest"], blobs


def docker_login(
    env: Env, d: Dockerd, creds: tuple[str, str], host: str | None = None
) -> subprocess.CompletedProcess[str]:
    host = host or env.proxy.host
    argv = [docker_cli(), "-H", d.host, "login", host, "-u", creds[0], "--password-stdin"]
    return env.keep_run(run(argv, env=d.env, input=creds[1] + "\n", check=False, timeout=60))


def docker_logout(env: Env, d: Dockerd, host: str | None = None) -> None:
    env.keep_run(d.docker("logout", host or env.proxy.host, timeout=60))


def cli_auths(d: Dockerd) -> dict[str, object]:
    assert d.base is not None
    return dict(json.loads((d.base / "cli" / "config.json").read_text()).get("auths", {}))


def pulled_digest(result: subprocess.CompletedProcess[str]) -> str:
    match = re.search(r"^Digest: (sha256:[0-9a-f]{64})$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return match.group(1)


def ctr_image_digests(d: Dockerd) -> dict[str, str]:
    """``ctr images ls``: reference -> target digest."""
    out = d.ctr("images", "ls", timeout=60).stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out if line.strip()}


# --------------------------------------------------------------------------- containerd


def test_ctr_mirrors_two_registry_hosts_by_ns(dockerd: Dockerd, env: Env, tmp_path: Path) -> None:
    alpine, ghcr_app, hub_app = env.images["alpine"], env.images["ghcr-app"], env.images["hub-app"]
    hosts = tmp_path / "certs.d"
    write_hosts_toml(hosts, "docker.io", env.proxy.url)
    write_hosts_toml(hosts, "ghcr.io", env.proxy.url)  # server https://ghcr.io, mirror regproxy
    dockerd.ctr_rmi_all()
    log = ProxyLog(env.proxy)

    for ref in ("docker.io/library/alpine:3", "ghcr.io/org/app:1"):
        env.keep_run(dockerd.ctr_pull(ref, hosts, timeout=PULL_TIMEOUT))
    assert ctr_image_digests(dockerd) == {
        "docker.io/library/alpine:3": alpine.digest,
        "ghcr.io/org/app:1": ghcr_app.digest,
    }
    # the bytes containerd stored are each upstream's own
    assert dockerd.base is not None
    store = dockerd.base / "cr" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    for image in (alpine, ghcr_app):
        documents = {image.digest: image.raw, **image.blobs}
        for digest in digests_of(image):
            assert (store / digest.removeprefix("sha256:")).read_bytes() == documents[digest]
    client = log.requests()
    assert client and all(status == 200 for _, _, status in client), client
    # routed by ?ns=ghcr.io (the access log shows the raw path, query included): not hub's org/app
    assert ("HEAD", "/v2/org/app/manifests/1?ns=ghcr.io", 200) in client
    # ?ns= routed each pull to its own upstream, and was not passed on
    assert_came_from(env, "hub", alpine)
    assert_came_from(env, "ghcr", ghcr_app)
    assert not [r.query for f in env.fronts.values() for r in f.requests if "ns=" in r.query]

    # docker.io/org/app is not for anonymous clients: ctr fetches an anonymous token, which
    # lacks the scope, and gives up on insufficient_scope; nothing reaches upstream
    before = {n: len(f.requests) for n, f in env.fronts.items()}
    log = ProxyLog(env.proxy)
    denied = env.keep_run(
        dockerd.ctr_pull("docker.io/org/app:1", hosts, check=False, timeout=PULL_TIMEOUT)
    )
    assert denied.returncode != 0
    assert "insufficient_scope" in denied.stderr, denied
    answered = log.requests()
    assert any(path.startswith("/token?") and status == 200 for _, path, status in answered)
    pulls = [r for r in answered if r[1].startswith("/v2/")]
    assert pulls and set(pulls) == {("HEAD", "/v2/org/app/manifests/1?ns=docker.io", 401)}
    assert {n: len(f.requests) for n, f in env.fronts.items()} == before
    assert "docker.io/org/app:1" not in ctr_image_digests(dockerd)

    # a wrong password: the token service refuses it (POST, then GET with Basic), no pull
    wrong = env.keep_run(
        dockerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--snapshotter",
            "native",
            "--user",
            f"{ALICE[0]}:not-{ALICE[1]}",
            "docker.io/org/app:1",
            check=False,
            timeout=PULL_TIMEOUT,
        )
    )
    assert wrong.returncode != 0
    assert {n: len(f.requests) for n, f in env.fronts.items()} == before

    # with --user ctr answers the challenge; same repository name, docker.io's content
    env.keep_run(
        dockerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--snapshotter",
            "native",
            "--user",
            f"{ALICE[0]}:{ALICE[1]}",
            "docker.io/org/app:1",
            timeout=PULL_TIMEOUT,
        )
    )
    assert ctr_image_digests(dockerd)["docker.io/org/app:1"] == hub_app.digest
    assert_came_from(env, "hub", hub_app)
    dockerd.ctr_rmi_all()


# --------------------------------------------------------------------------- skopeo


def test_skopeo_path_prefix_pulls_and_rules(env: Env, tmp_path: Path) -> None:
    ghcr_app, secret = env.images["ghcr-app"], env.images["secret"]

    # anonymous may pull ghcr.io/*
    skopeo_copy(env, "ghcr.io/org/app:1", tmp_path / "ghcr").check_returncode()
    top, blobs = oci_layout(tmp_path / "ghcr")
    assert top == ghcr_app.digest
    assert blobs == {ghcr_app.digest: ghcr_app.raw, **ghcr_app.blobs}
    assert_came_from(env, "ghcr", ghcr_app)

    # bob may pull docker.io/* (anonymous may not: not library/); a name without an upstream
    # prefix is the default upstream's, whatever ghcr.io has under the same name
    hub_app = env.images["hub-app"]
    assert skopeo_copy(env, "org/app:1", tmp_path / "anon-app").returncode != 0
    skopeo_copy(env, "org/app:1", tmp_path / "bob-app", creds=BOB).check_returncode()
    top, blobs = oci_layout(tmp_path / "bob-app")
    assert top == hub_app.digest
    assert blobs == {hub_app.digest: hub_app.raw, **hub_app.blobs}
    assert_came_from(env, "hub", hub_app)

    # the private upstream: alice only, with regproxy's own credentials upstream
    corp_before = len(env.corp.requests)
    anonymous = skopeo_copy(env, "corp/team/secret:1", tmp_path / "anon")
    assert anonymous.returncode != 0
    assert "unauthorized" in anonymous.stderr.lower(), anonymous.stderr
    as_bob = skopeo_copy(env, "corp/team/secret:1", tmp_path / "bob", creds=BOB)
    assert as_bob.returncode != 0
    assert "denied" in as_bob.stderr.lower(), as_bob.stderr
    assert len(env.corp.requests) == corp_before, "a denied pull reached the private upstream"
    for denied in ("anon", "bob"):
        blob_dir = tmp_path / denied / "blobs" / "sha256"
        got = {f.name for f in blob_dir.iterdir()} if blob_dir.exists() else set()
        assert not got & {d.removeprefix("sha256:") for d in digests_of(secret)}

    wrong = skopeo_copy(env, "corp/team/secret:1", tmp_path / "wrong", (ALICE[0], "nope"))
    assert wrong.returncode != 0
    assert len(env.corp.requests) == corp_before
    skopeo_copy(env, "corp/team/secret:1", tmp_path / "alice", creds=ALICE).check_returncode()
    top, blobs = oci_layout(tmp_path / "alice")
    assert top == secret.digest
    assert blobs == {secret.digest: secret.raw, **secret.blobs}
    assert_came_from(env, "corp", secret)
    corp_auth = {r.headers.get("Authorization") for r in env.corp.requests if r.status == 200}
    assert corp_auth == {f"Basic {b64(':'.join(CORP_CREDS))}"}


# --------------------------------------------------------------------------- docker


def test_docker_mirror_pulls_from_default_upstream(docker: Dockerd, env: Env) -> None:
    alpine = env.images["alpine"]
    log = ProxyLog(env.proxy)

    result = env.keep_run(docker.pull("alpine:3", timeout=PULL_TIMEOUT))
    assert pulled_digest(result) == alpine.digest
    assert f"Trying to pull alpine from {env.proxy.url}" in docker.logs()
    assert docker.image_id("alpine:3") == alpine.child(PLATFORM or "").config_digest
    assert docker.repo_digests("alpine:3") == [f"alpine@{alpine.digest}"]
    client = log.requests()
    # the ping is challenged; the pull itself (anonymous rule: docker.io/library/*) is not
    assert client[0] == ("GET", "/v2/", 401), client
    assert ("HEAD", "/v2/library/alpine/manifests/3", 200) in client
    assert all(status == 200 for _, path, status in client if path != "/v2/"), client
    assert_came_from(env, "hub", alpine)


def test_docker_mirror_pulls_anonymously_without_any_login(docker: Dockerd, env: Env) -> None:
    """A daemon logged in to nothing (a CI runner): the Bearer challenge makes it fetch an
    anonymous token, so the pull goes through regproxy; a fallback to Docker Hub would fail
    (the offline guard), so success proves there was none."""
    alpine = env.images["alpine"]
    assert docker.base is not None
    config = docker.base / "cli" / "config.json"
    saved = config.read_text()
    config.write_text('{"auths": {}}\n')
    log = ProxyLog(env.proxy)
    try:
        result = env.keep_run(docker.pull("alpine:3", timeout=PULL_TIMEOUT))
    finally:
        config.write_text(saved)
    assert pulled_digest(result) == alpine.digest
    assert docker.image_id("alpine:3") == alpine.child(PLATFORM or "").config_digest
    client = log.requests()
    assert client[0] == ("GET", "/v2/", 401), client
    tokens = [r for r in client if r[1].startswith("/token?")]
    assert tokens and all(status == 200 for _, _, status in tokens), client
    assert ("HEAD", "/v2/library/alpine/manifests/3", 200) in client
    assert all(status == 200 for _, path, status in client if path != "/v2/"), client
    assert "no basic auth credentials" not in docker.logs()
    # a private image through the mirror: refused (insufficient scope), never served
    corp_before = len(env.corp.requests)
    config.write_text('{"auths": {}}\n')
    try:
        denied = env.keep_run(docker.pull("corp/team/secret:1", check=False, timeout=PULL_TIMEOUT))
    finally:
        config.write_text(saved)
    assert denied.returncode != 0
    assert len(env.corp.requests) == corp_before


def test_podman_mirror_pulls_anonymously(env: Env) -> None:
    """podman with regproxy as a registries.conf mirror and no login: anonymous token, pull
    through regproxy (a fallback to docker.io would fail on the offline guard)."""
    alpine = env.images["alpine"]
    log = ProxyLog(env.proxy)
    with Podman([env.proxy.url]) as p:
        env.keep_run(p.pull("docker.io/library/alpine:3", timeout=PULL_TIMEOUT))
        config = alpine.child(PLATFORM or "").config_digest
        assert p.image_id("docker.io/library/alpine:3") == config.removeprefix("sha256:")
    # (its HTTPS probe of the plain port is logged as a 400 for "/", whatever it parsed)
    client = [r for r in log.requests() if r[1].startswith(("/v2/", "/token?"))]
    assert ("GET", "/v2/", 401) in client
    assert any(path.startswith("/token?") and status == 200 for _, path, status in client)
    # 2xx: containers/image may resume a slow blob with a Range request (206)
    refused = [r for r in client if r[1] != "/v2/" and not 200 <= r[2] < 300]
    assert not refused, client


def test_podman_login_and_pull_of_private_image(env: Env) -> None:
    secret = env.images["secret"]
    ref = f"{env.proxy.host}/corp/team/secret:1"
    with Podman() as p:
        login = ["login", "--tls-verify=false", env.proxy.host, "-u", ALICE[0]]
        wrong = env.keep_run(p.podman(*login, "-p", "not-" + ALICE[1], check=False, timeout=60))
        assert wrong.returncode != 0, wrong
        assert re.search(r"401|unauthorized|invalid", wrong.stderr, re.I), wrong.stderr
        anonymous = env.keep_run(p.pull(ref, tls_verify=False, check=False, timeout=PULL_TIMEOUT))
        assert anonymous.returncode != 0
        assert not p.image_ids()

        env.keep_run(p.podman(*login, "-p", ALICE[1], timeout=60))
        env.keep_run(p.pull(ref, tls_verify=False, timeout=PULL_TIMEOUT))
        assert p.image_id(ref) == secret.child(PLATFORM or "").config_digest.removeprefix("sha256:")
        assert_came_from(env, "corp", secret)


def test_docker_login_and_direct_pull_of_private_image(docker: Dockerd, env: Env) -> None:
    secret = env.images["secret"]
    ref = f"{env.proxy.host}/corp/team/secret:1"
    try:
        wrong = docker_login(env, docker, (ALICE[0], "not-" + ALICE[1]))
        assert wrong.returncode != 0
        assert re.search(r"401|unauthorized", wrong.stderr, re.I), wrong.stderr
        assert env.proxy.host not in cli_auths(docker)

        ok = docker_login(env, docker, ALICE)
        assert ok.returncode == 0 and "Login Succeeded" in ok.stdout, ok
        assert env.proxy.host in cli_auths(docker)

        result = env.keep_run(docker.pull(ref, timeout=PULL_TIMEOUT))
        assert pulled_digest(result) == secret.digest
        assert docker.image_id(ref) == secret.child(PLATFORM or "").config_digest
        assert docker.repo_digests(ref) == [f"{env.proxy.host}/corp/team/secret@{secret.digest}"]
        assert_came_from(env, "corp", secret)

        # logged out: dockerd's anonymous token lacks the scope; refused, nothing revealed
        docker_logout(env, docker)
        docker.rmi_all()
        corp_before = len(env.corp.requests)
        log = ProxyLog(env.proxy)
        anonymous = env.keep_run(docker.pull(ref, check=False, timeout=PULL_TIMEOUT))
        assert anonymous.returncode != 0
        assert re.search(r"unauthorized|denied|insufficient_scope", anonymous.stderr, re.I)
        # (its HTTPS probe of the plain port is the one 400, logged as method UNKNOWN)
        answered = [r for r in log.requests() if r[0] != "UNKNOWN" and r[1].startswith("/v2/")]
        assert answered and all(status in (401, 403) for _, _, status in answered), answered

        # bob is logged in but not allowed: DENIED, not a challenge
        assert docker_login(env, docker, BOB).returncode == 0
        as_bob = env.keep_run(docker.pull(ref, check=False, timeout=PULL_TIMEOUT))
        assert as_bob.returncode != 0
        assert "denied" in as_bob.stderr.lower(), as_bob.stderr
        assert len(env.corp.requests) == corp_before, "a denied pull reached the private upstream"
        assert secret.digest not in docker.docker("image", "ls", "--digests").stdout
    finally:
        docker.docker("logout", env.proxy.host, check=False, timeout=60)


def test_dockerd_https_probe_is_logged_without_a_traceback(docker: Dockerd, env: Env) -> None:
    """dockerd tries HTTPS first on an insecure registry it addresses directly (``docker login``,
    ``docker pull HOST/...``); regproxy answers that ClientHello with aiohttp's 400 ("Received
    HTTPS traffic on an HTTP port"), and the request must be logged on one line like any other."""
    log = ProxyLog(env.proxy)
    try:
        assert docker_login(env, docker, ALICE).returncode == 0
    finally:
        docker.docker("logout", env.proxy.host, check=False, timeout=60)
    text = log.text()
    assert "Traceback" not in text and "Unhandled exception" not in text, text
    assert [r for r in log.requests() if r[2] == 400], log.requests()


# --------------------------------------------------------------------------- isolation


def test_private_blob_is_not_served_under_a_public_name(env: Env, tmp_path: Path) -> None:
    secret = env.images["secret"]
    child = secret.child(PLATFORM or "")
    private = [child.config_digest, *child.layers]
    # alice pulls the private image: its blobs are now in regproxy's shared blob store
    skopeo_copy(env, "corp/team/secret:1", tmp_path / "alice", creds=ALICE).check_returncode()

    # anonymous (and even alice) guessing the digests under a public name: nothing
    for name in ("library/alpine", "ghcr.io/org/app", "org/app?ns=ghcr.io"):
        repo, _, query = name.partition("?")
        suffix = f"?{query}" if query else ""
        for creds in (None, ALICE):
            for digest in private:
                for method in ("GET", "HEAD"):
                    path = f"/v2/{repo}/blobs/{digest}{suffix}"
                    status, headers, body = request(env, path, method, creds)
                    assert status == 404, (method, path, creds)
                    assert "Docker-Content-Digest" not in headers
                    assert secret.blobs[digest] not in body
                    if method == "GET":
                        assert error_code(body) == "BLOB_UNKNOWN"
            status, _, body = request(env, f"/v2/{repo}/manifests/{secret.digest}{suffix}")
            assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN", body
    guessed = skopeo_inspect_raw(env, f"library/alpine@{secret.digest}")
    assert guessed.returncode != 0 and "manifest unknown" in guessed.stderr.lower(), guessed
    assert secret.raw.decode() not in guessed.stdout

    # the private name itself: anonymous is challenged, bob denied, alice gets the bytes
    for digest in private:
        path = f"/v2/corp/team/secret/blobs/{digest}"
        status, _, body = request(env, path)
        assert (status, error_code(body)) == (401, "UNAUTHORIZED")
        status, _, body = request(env, path, creds=BOB)
        assert (status, error_code(body)) == (403, "DENIED")
        assert request(env, path, creds=ALICE)[::2] == (200, secret.blobs[digest])
    raw = skopeo_inspect_raw(env, f"corp/team/secret@{secret.digest}", creds=ALICE)
    assert raw.returncode == 0 and raw.stdout.encode() == secret.raw
    assert skopeo_inspect_raw(env, f"corp/team/secret@{secret.digest}").returncode != 0


# --------------------------------------------------------------------------- credentials


def test_credentials_never_leak(env: Env, tmp_path: Path) -> None:
    """Client and upstream credentials: not in regproxy's log, responses, or upstream requests.

    A second dockerd pulls through a recording Front in front of regproxy, to show that it
    really sends its Docker Hub login to the mirror (so the upstream checks are not vacuous).
    """
    spy = Front(env.proxy.url)
    spy.start()
    try:
        with Dockerd([spy.url]) as d:
            write_hub_login(d)
            env.keep_run(d.pull("alpine:3", timeout=PULL_TIMEOUT))
            assert docker_login(env, d, ALICE, host=spy.host).returncode == 0
            env.keep_run(d.pull(f"{spy.host}/corp/team/secret:1", timeout=PULL_TIMEOUT))
            docker_logout(env, d, host=spy.host)
    finally:
        spy.stop()
    # The realm named regproxy's own address (the spy does not forward Host), so dockerd took
    # its token requests there directly: with its Hub login (account=hubuser), then alice's.
    sent = {r.headers.get("Authorization", "").partition(" ")[0] for r in spy.requests}
    assert "Bearer" in sent, sent
    tokens = [line for line in env.proxy.logs().splitlines() if "path=/token?" in line]
    assert [t for t in tokens if f"account={HUB_LOGIN[0]}" in t], "dockerd never sent its Hub login"
    assert [t for t in tokens if f"account={ALICE[0]}" in t and "status=200" in t]

    # more answers that could echo something: errors, metrics, inspect
    request(env, "/v2/corp/team/secret/manifests/1", creds=(ALICE[0], "wrong"))
    request(env, "/v2/corp/team/missing/manifests/1", creds=ALICE)
    request(env, "/v2/library/alpine/manifests/3", creds=HUB_LOGIN)
    request(env, "/metrics")
    request(env, "/_regproxy/inspect?image=corp/team/secret:1", creds=ALICE)

    secrets = {
        "corp upstream password": (CORP_CREDS[1], f"{CORP_CREDS[0]}:{CORP_CREDS[1]}"),
        "alice's password": (ALICE[1], ":".join(ALICE)),
        "bob's password": (BOB[1], ":".join(BOB)),
        "dockerd's Hub token": (HUB_LOGIN[1], ":".join(HUB_LOGIN)),
    }
    logs = env.proxy.logs()
    seen = "\n".join(env.seen)
    assert seen, "no responses collected"
    for what, (secret, pair) in secrets.items():
        for form in (secret, b64(secret), b64(pair)):
            assert form not in logs, f"{what} in regproxy's log"
            assert form not in seen, f"{what} in a response or client output"

    # upstreams: anonymous ones see no Authorization at all, corp only regproxy's own login
    for name, front in env.fronts.items():
        values = [v for r in front.requests for v in r.headers.values()]
        for what, (secret, pair) in secrets.items():
            if name == "corp" and what == "corp upstream password":
                continue
            for form in (secret, b64(secret), b64(pair)):
                assert not [v for v in values if form in v], f"{what} reached the {name} upstream"
    assert not env.hub.saw_authorization and not env.ghcr.saw_authorization
    corp_auth = {r.headers.get("Authorization") for r in env.corp.requests}
    assert corp_auth <= {None, f"Basic {b64(':'.join(CORP_CREDS))}"}, corp_auth
