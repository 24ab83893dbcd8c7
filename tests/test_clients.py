"""Real clients pulling through regproxy: docker, podman, containerd's ctr and skopeo.

Topology (all on 127.0.0.1, no internet)::

    dockerd (registry-mirrors) ─┐
    podman (registries.conf)    ├─> regproxy ──────────> Front ──────────> docker-registry
    ctr (hosts.toml, ?ns=)      │   module-scoped,        module-scoped,    (seeded_registry)
    skopeo (docker://proxy/...) ┘   fixed port,           counts every
                                    --tag-ttl 5m          upstream request

One ``Dockerd`` serves the whole module. Its mirror is fixed when it starts, so the proxy keeps
its port for the whole module (``ProxyProcess.restart()`` reuses it), and a test that needs
another upstream re-points the module Front (``Front.upstream``) instead of starting a proxy.
The ``up`` fixture resets the Front's counts and target for each test.

Every client runs with the harness' offline guard (``HTTPS_PROXY`` at a refusing port): dockerd
and podman fall back to Docker Hub after any mirror error, and that fallback fails at once, so a
pull that succeeds went through regproxy.

Asserted is what a user checks: exit codes (``run`` raises ``CommandFailed``), the architecture
``docker image inspect`` reports, image IDs equal to the seeded config digests, RepoDigests equal
to the upstream's index digests, and the exact requests that reached the upstream.

How the clients talk to regproxy (seen with a recording Front in front of regproxy):

* dockerd 20.10: ``GET /v2/``, ``HEAD`` the tag, ``GET`` the index by digest, ``GET`` the child
  by digest, ``GET`` blobs. ``Accept`` comes as *six separate header lines* (the four manifest
  types plus schema1 ``+prettyjws`` and ``application/json``) in a random order per request (Go
  map iteration). The User-Agent says ``arch/amd64`` even for ``--platform linux/arm64``.
* podman 4.3 / skopeo 1.9 (containers/image): ``GET /v2/``, then ``GET`` (not HEAD) the tag with
  six ``Accept`` lines in a fixed order, OCI *manifest* first and OCI index last.
* ctr 1.6: ``HEAD`` the tag with one comma-joined ``Accept`` (four types and ``*/*``), then
  ``GET``\\ s by digest, each with ``Accept: <expected type>, */*``; every request has
  ``?ns=docker.io``.

A client must get the index for a tag whatever order its ``Accept`` lines come in (regproxy
once read only the first line; ``test_accept_as_separate_header_lines_gets_the_index`` replays
the exact header lines of dockerd and containers/image).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import platform
import re
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.clients import Dockerd, Podman, skopeo_copy_all, write_hosts_toml
from tests.harness.front import Front
from tests.harness.images import OCI_INDEX, SeededImage, SeededRegistry, tag_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.tokens import TokenRegistry
from tests.harness.tools import free_port

pytestmark = pytest.mark.e2e

TAG_TTL = "5m"
PULL_TIMEOUT = 120.0
#: The seeded child a client picks by default on this host.
HOST_PLATFORM = {"x86_64": "linux/amd64", "aarch64": "linux/arm64/v8"}.get(platform.machine())


#: ``Accept`` exactly as containers/image (podman 4.3, skopeo 1.9) sends it: one line per type.
CONTAINERS_IMAGE_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
#: One of the orders dockerd 20.10 sent (a Go map iteration: it changes per request).
DOCKERD_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
    "application/vnd.oci.image.manifest.v1+json",
)
DOCKERD_UA = (
    "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))"
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- fixtures


@dataclass
class Stack:
    """The module's regproxy, the Front behind it and the seeded registry behind that."""

    seeded: SeededRegistry
    front: Front
    proxy: ProxyProcess

    def image(self, reference: str) -> SeededImage:
        return self.seeded[reference]

    def reset_upstream(self) -> Front:
        """Front running, pointed at the seeded registry, no faults, no recorded requests."""
        self.front.upstream = self.seeded.url
        self.front.start()
        self.front.clear_faults()
        self.front.reset()
        return self.front


@pytest.fixture(scope="module")
def stack(
    seeded_registry: SeededRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("clients-regproxy")
    front = Front(seeded_registry.registry)
    front.start()
    proxy = ProxyProcess(
        front.url,
        base / "storage",
        extra_args=["--tag-ttl", TAG_TTL],
        log_path=base / "regproxy.log",
    )
    try:
        proxy.start()
        yield Stack(seeded_registry, front, proxy)
    finally:
        proxy.stop()
        front.stop()


@pytest.fixture
def up(stack: Stack) -> Iterator[Front]:
    """The module Front, reset for this test (and restored afterwards)."""
    front = stack.reset_upstream()
    yield front
    stack.reset_upstream()


@pytest.fixture(scope="module")
def dockerd(stack: Stack) -> Iterator[Dockerd]:
    with Dockerd([stack.proxy.url]) as d:
        yield d


@pytest.fixture
def docker(dockerd: Dockerd) -> Dockerd:
    """The module dockerd without images, so every pull downloads everything again."""
    dockerd.rmi_all()
    return dockerd


def host_platform() -> str:
    if HOST_PLATFORM is None:
        pytest.skip(f"no seeded platform for host machine {platform.machine()!r}")
    return HOST_PLATFORM


def os_arch(platform_: str) -> str:
    """``linux/arm64/v8`` -> ``linux/arm64``."""
    return "/".join(platform_.split("/")[:2])


# --------------------------------------------------------------------------- observing


_ACCESS = re.compile(
    r"request method=(?P<method>[A-Z]+) path=(?P<path>\S+) status=(?P<status>\d+) "
    r"bytes=\S+ duration=\S+ cache=(?P<cache>\S+)"
)


class ProxyLog:
    """regproxy's log from construction on; its access lines are what the client asked for."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.mark = len(proxy.logs())

    def text(self) -> str:
        return self.proxy.logs()[self.mark :]

    def requests(self) -> list[tuple[str, str, int, str]]:
        """``(method, path, status, X-Cache)`` of every request the proxy answered."""
        return [
            (m["method"], m["path"], int(m["status"]), m["cache"])
            for m in _ACCESS.finditer(self.text())
        ]


def upstream_calls(front: Front) -> list[tuple[str, str]]:
    """Sorted ``(method, path[?query])`` of every request the Front received."""
    return sorted((r.method, r.path + (f"?{r.query}" if r.query else "")) for r in front.requests)


def cold_pull_calls(
    image: SeededImage, platform_: str, *, tag_cached: bool
) -> list[tuple[str, str]]:
    """What a pull of one platform costs upstream when regproxy has none of its content.

    The tag is revalidated with a HEAD (never a GET: Docker Hub counts manifest GETs as pulls);
    the client's GET of the index *by digest* is one upstream GET, as are the child manifest and
    each blob of that platform.
    """
    repo = f"/v2/{image.repository}"
    child = image.children[platform_]
    calls = []
    if not tag_cached:
        calls.append(("HEAD", f"{repo}/manifests/{image.tag}"))
        if not image.single:
            calls.append(("GET", f"{repo}/manifests/{image.digest}"))
    calls.append(("GET", f"{repo}/manifests/{child.digest}"))
    calls += [("GET", f"{repo}/blobs/{d}") for d in (child.config_digest, *child.layers)]
    return sorted(calls)


def pulled_digest(result: subprocess.CompletedProcess[str]) -> str:
    """The ``Digest:`` ``docker pull`` printed: what the tag resolved to for dockerd."""
    match = re.search(r"^Digest: (sha256:[0-9a-f]{64})$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return match.group(1)


def assert_tag_resolved_to_index(
    image: SeededImage, digests: Iterable[str], what: str, *, all_for_tag: bool = True
) -> None:
    """The client resolved the tag to the index, never to one platform's child.

    ``digests`` are what the tag resolved to for the client (``docker pull``'s ``Digest:``, an
    OCI layout's top descriptor). With ``all_for_tag=False`` they are RepoDigests, which may
    also list the instance pulled, so only the index's presence is required.
    """
    got = [d.rpartition("@")[2] for d in digests]
    children = {c.digest: p for p, c in image.children.items()}
    served = [f"{d} ({children[d]} child)" for d in got if d in children]
    if all_for_tag:
        assert not served, f"{what}: got {served}, index is {image.digest}"
    assert image.digest in got, f"{what}: got {got}, index is {image.digest}"


# --------------------------------------------------------------------------- docker


def test_docker_pulls_oci_index_for_host_and_arm64(
    docker: Dockerd, stack: Stack, up: Front
) -> None:
    alpine = stack.image("library/alpine:3.19")
    host = host_platform()
    log = ProxyLog(stack.proxy)

    digest = pulled_digest(docker.pull("alpine:3.19", timeout=PULL_TIMEOUT))
    assert "Trying to pull alpine from " + stack.proxy.url in docker.logs()
    os_, arch, _ = docker.inspect_arch("alpine:3.19")
    assert f"{os_}/{arch}" == os_arch(host)
    host_id = docker.image_id("alpine:3.19")
    assert host_id == alpine.children[host].config_digest
    assert_tag_resolved_to_index(alpine, [digest], "docker pull alpine:3.19")
    assert digest == alpine.digest
    # dockerd 20.10 keeps familiar names; the digest is the index's, as on Docker Hub
    assert docker.repo_digests("alpine:3.19") == [f"alpine@{alpine.digest}"]
    assert upstream_calls(up) == cold_pull_calls(alpine, host, tag_cached=False), log.text()
    # regproxy's HEAD answer carried Docker-Content-Digest: dockerd did not GET the tag
    client = log.requests()
    assert ("HEAD", "/v2/library/alpine/manifests/3.19", 200, "MISS") in client, client
    assert ("GET", "/v2/library/alpine/manifests/3.19") not in [c[:2] for c in client]
    assert all(status == 200 for _, _, status, _ in client), client

    up.reset()
    digest = pulled_digest(docker.pull("alpine:3.19", platform="linux/arm64", timeout=PULL_TIMEOUT))
    assert_tag_resolved_to_index(alpine, [digest], "docker pull --platform linux/arm64")
    assert digest == alpine.digest
    assert docker.inspect_arch("alpine:3.19") == ("linux", "arm64", "v8")
    arm64 = alpine.children["linux/arm64/v8"]
    assert docker.image_id("alpine:3.19") == arm64.config_digest
    # dockerd 20.10 never moves a digest reference ("Image ID for digest ... changed ...,
    # cannot update"): alpine@<index> stays with the first (now untagged) amd64 image
    assert docker.repo_digests(host_id) == [f"alpine@{alpine.digest}"]
    # tag and index are cached (within the TTL): only the arm64 child and its blobs go out
    assert upstream_calls(up) == cold_pull_calls(alpine, "linux/arm64/v8", tag_cached=True)


@pytest.mark.parametrize(
    "reference", ["library/busybox:1.36", "library/hello:latest"], ids=["docker-list", "single"]
)
def test_docker_pulls_docker_list_and_single_manifest(
    docker: Dockerd, stack: Stack, up: Front, reference: str
) -> None:
    image = stack.image(reference)
    host = next(iter(image.children)) if image.single else host_platform()
    familiar = reference.removeprefix("library/")
    name = familiar.partition(":")[0]

    digest = pulled_digest(docker.pull(familiar, timeout=PULL_TIMEOUT))
    os_, arch, _ = docker.inspect_arch(familiar)
    assert f"{os_}/{arch}" == os_arch(host)
    assert docker.image_id(familiar) == image.children[host].config_digest
    if not image.single:
        assert_tag_resolved_to_index(image, [digest], f"docker pull {familiar}")
    assert digest == image.digest
    assert docker.repo_digests(familiar) == [f"{name}@{image.digest}"]
    assert upstream_calls(up) == cold_pull_calls(image, host, tag_cached=False)


def test_docker_second_pull_is_served_from_cache(docker: Dockerd, stack: Stack, up: Front) -> None:
    alpine = stack.image("library/alpine:3.19")
    host = host_platform()
    docker.pull("alpine:3.19", timeout=PULL_TIMEOUT)  # warm (a no-op upstream after the above)
    docker.rmi_all()
    up.reset()
    log = ProxyLog(stack.proxy)

    digest = pulled_digest(docker.pull("alpine:3.19", timeout=PULL_TIMEOUT))
    assert up.count("GET", "/blobs/") == 0
    assert up.count("GET", "/manifests/") == 0
    assert upstream_calls(up) == []  # not even a HEAD of the tag within its TTL
    assert docker.image_id("alpine:3.19") == alpine.children[host].config_digest
    client = log.requests()
    blobs = [c for c in client if "/blobs/" in c[1]]
    assert len(blobs) == 1 + len(alpine.children[host].layers), client
    assert all(cache == "HIT" for _, path, _, cache in client if path != "/v2/"), client
    assert_tag_resolved_to_index(alpine, [digest], "cached docker pull")
    assert digest == alpine.digest
    assert docker.repo_digests("alpine:3.19") == [f"alpine@{alpine.digest}"]


# --------------------------------------------------------------------------- podman


def test_podman_pulls_through_registries_conf_mirror(stack: Stack, up: Front) -> None:
    alpine = stack.image("library/alpine:3.19")
    host = host_platform()
    ref = "docker.io/library/alpine:3.19"
    with Podman([stack.proxy.url]) as p:
        log = ProxyLog(stack.proxy)
        p.pull(ref, arch="arm64", timeout=PULL_TIMEOUT)
        # containers/image tries TLS first on an "insecure" mirror: regproxy logs that
        # ClientHello as "UNKNOWN /" 400, then podman falls back to plain HTTP
        client = [c for c in log.requests() if c[1].startswith("/v2/")]
        assert ("GET", "/v2/library/alpine/manifests/3.19", 200) in [c[:3] for c in client]
        assert all(status == 200 for _, _, status, _ in client), client
        assert_tag_resolved_to_index(
            alpine,
            p.inspect(ref)["RepoDigests"],
            "podman pull --arch arm64 RepoDigests",
            all_for_tag=False,
        )
        assert p.inspect_arch(ref) == ("linux", "arm64", "v8")
        arm64 = alpine.children["linux/arm64/v8"]
        assert "sha256:" + p.image_id(ref).removeprefix("sha256:") == arm64.config_digest
        assert f"docker.io/library/alpine@{alpine.digest}" in p.inspect(ref)["RepoDigests"]

        p.pull(ref, timeout=PULL_TIMEOUT)
        os_, arch, _ = p.inspect_arch(ref)
        assert f"{os_}/{arch}" == os_arch(host)
        host_config = alpine.children[host].config_digest
        assert "sha256:" + p.image_id(ref).removeprefix("sha256:") == host_config
        assert f"docker.io/library/alpine@{alpine.digest}" in p.inspect(ref)["RepoDigests"]
    # whatever was not cached yet came from the seeded registry, once
    calls = upstream_calls(up)
    assert len(calls) == len(set(calls)), calls
    assert not [c for c in calls if c[0] == "GET" and c[1].endswith("/manifests/3.19")], calls


# --------------------------------------------------------------------------- containerd


def test_ctr_pulls_arm64_with_hosts_dir(
    dockerd: Dockerd, stack: Stack, up: Front, tmp_path: Path
) -> None:
    busybox = stack.image("library/busybox:1.36")
    arm64 = busybox.children["linux/arm64/v8"]
    others = [c for p, c in busybox.children.items() if p != "linux/arm64/v8"]
    documents = {**busybox.manifests, **busybox.blobs}
    hosts = tmp_path / "certs.d"
    write_hosts_toml(hosts, "docker.io", stack.proxy.url)
    ref = "docker.io/library/busybox:1.36"

    def pull() -> None:
        dockerd.ctr_rmi_all()
        dockerd.ctr_pull(ref, hosts, platform="linux/arm64", timeout=PULL_TIMEOUT)
        assert dockerd.ctr_images() == [ref]

    log = ProxyLog(stack.proxy)
    pull()
    content = set(dockerd.ctr_content())
    wanted = {busybox.digest, arm64.digest, arm64.config_digest, *arm64.layers}
    assert wanted <= content
    for other in others:  # only the asked-for platform was fetched
        assert not {other.digest, other.config_digest, *other.layers} & content
    # the bytes containerd stored under those digests are the seeded ones
    assert dockerd.base is not None
    store = dockerd.base / "cr" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    for digest in wanted:
        assert (store / digest.removeprefix("sha256:")).read_bytes() == documents[digest]
    assert all(status == 200 for _, _, status, _ in log.requests()), log.requests()
    calls = upstream_calls(up)
    # regproxy routed ?ns=docker.io to its default upstream and did not pass ns= on
    assert not [c for c in calls if "ns=" in c[1]], calls
    assert not [c for c in calls for o in others if o.digest in c[1]], calls
    assert len(calls) == len(set(calls)), calls

    # once cached, a second cold ctr pull costs upstream nothing
    up.reset()
    pull()
    assert upstream_calls(up) == []


# --------------------------------------------------------------------------- skopeo


def test_skopeo_copy_all_preserves_index_with_attestations(
    stack: Stack, up: Front, tmp_path: Path
) -> None:
    redis = stack.image("library/redis:7")
    assert redis.attestations, "seeded redis:7 should carry attestation manifests"
    expected = {**redis.manifests, **redis.blobs}

    for attempt in ("cold", "cached"):
        dest = tmp_path / attempt
        up.reset()
        skopeo_copy_all(f"{stack.proxy.host}/library/redis:7", dest, timeout=PULL_TIMEOUT)
        (top,) = json.loads((dest / "index.json").read_text())["manifests"]
        assert_tag_resolved_to_index(redis, [top["digest"]], f"skopeo copy --all ({attempt})")
        assert top["digest"] == redis.digest
        blob_dir = dest / "blobs" / "sha256"
        stored = {"sha256:" + f.name: f.read_bytes() for f in blob_dir.iterdir()}
        for digest, data in stored.items():
            assert sha256(data) == digest
        assert stored == expected
        index = json.loads(stored[redis.digest])
        kinds = [
            m.get("annotations", {}).get("vnd.docker.reference.type") for m in index["manifests"]
        ]
        assert kinds.count("attestation-manifest") == len(redis.attestations)

        calls = upstream_calls(up)
        if attempt == "cold":
            # skopeo GETs the tag; regproxy still only HEADs it upstream, then GETs by digest
            assert ("HEAD", "/v2/library/redis/manifests/7") in calls
            assert ("GET", "/v2/library/redis/manifests/7") not in calls
            gets = sorted(path for method, path in calls if method == "GET")
            assert gets == sorted(
                [f"/v2/library/redis/manifests/{d}" for d in redis.manifests]
                + [f"/v2/library/redis/blobs/{d}" for d in redis.blobs]
            ), calls
        else:
            assert calls == []


# --------------------------------------------------------------------------- wire format


@pytest.mark.parametrize(
    ("accept", "user_agent"),
    [
        (CONTAINERS_IMAGE_ACCEPT, "containers/5.23.1 (github.com/containers/image)"),
        (DOCKERD_ACCEPT, DOCKERD_UA),
    ],
    ids=["containers-image", "dockerd"],
)
@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_accept_as_separate_header_lines_gets_the_index(
    stack: Stack, accept: tuple[str, ...], user_agent: str, method: str
) -> None:
    """The tag request exactly as podman/skopeo/dockerd send it: one ``Accept`` line per type.

    RFC 9110 §5.3: repeated header lines equal one comma-joined line, and every list here
    names the OCI index type, so the answer must be the index.
    """
    alpine = stack.image("library/alpine:3.19")
    conn = http.client.HTTPConnection("127.0.0.1", stack.proxy.port, timeout=30)
    try:
        conn.putrequest(method, "/v2/library/alpine/manifests/3.19", skip_accept_encoding=True)
        for media_type in accept:
            conn.putheader("Accept", media_type)
        conn.putheader("User-Agent", user_agent)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert (resp.getheader("Docker-Content-Digest"), resp.getheader("Content-Type")) == (
        alpine.digest,
        OCI_INDEX,
    )
    if method == "GET":
        assert body == alpine.raw


# --------------------------------------------------------------------------- token auth


def test_docker_pull_through_bearer_token_upstream(
    docker: Dockerd, stack: Stack, up: Front, token_registry: TokenRegistry
) -> None:
    # A repository only the token registry has, so nothing can come from regproxy's cache.
    image = tag_image(
        token_registry.registry,
        token_registry.image,
        "1",
        repository="library/tokenimg",
        creds=token_registry.creds,
    )
    token_registry.issuer.reset()
    host = host_platform()
    up.upstream = token_registry.url

    digest = pulled_digest(docker.pull("tokenimg:1", timeout=PULL_TIMEOUT))
    assert docker.image_id("tokenimg:1") == image.children[host].config_digest

    issued = list(token_registry.issuer.issued)
    assert issued, "regproxy never asked the issuer for a token"
    assert all(
        scopes == ("repository:library/tokenimg:pull",) and user is None for scopes, user in issued
    ), issued
    challenged = [r for r in up.requests if r.status == 401]
    assert challenged, "the upstream never challenged"
    assert not [r for r in challenged if "Authorization" in r.headers]
    ok = [r for r in up.requests if r.status == 200]
    assert ok and all(r.headers.get("Authorization", "").startswith("Bearer ") for r in ok)
    # one token per scope, reused for the whole pull
    assert len(issued) == 1, issued

    assert_tag_resolved_to_index(image, [digest], "docker pull tokenimg:1")
    assert digest == image.digest
    assert docker.repo_digests("tokenimg:1") == [f"tokenimg@{image.digest}"]


# --------------------------------------------------------------------------- outages


def test_docker_pulls_while_upstream_is_down_and_after_restart(
    docker: Dockerd, stack: Stack, up: Front
) -> None:
    alpine = stack.image("library/alpine:3.19")
    host = host_platform()
    config = alpine.children[host].config_digest
    seen_digests: list[str] = []

    def pull_again() -> str:
        docker.rmi_all()
        digest = pulled_digest(docker.pull("alpine:3.19", timeout=PULL_TIMEOUT))
        assert docker.image_id("alpine:3.19") == config
        seen_digests.append(digest)
        return digest

    docker.pull("alpine:3.19", timeout=PULL_TIMEOUT)  # cached, and the tag within its TTL
    proxy = stack.proxy
    saved_args = list(proxy.extra_args)
    try:
        up.stop()  # the upstream refuses connections
        pull_again()
        proxy.restart()  # the cache and the tag's freshness survive a restart
        pull_again()

        # Past the TTL, revalidation fails and the cached tag is served stale.
        proxy.extra_args = ["--tag-ttl", "1s"]
        proxy.restart()
        time.sleep(1.2)
        log = ProxyLog(proxy)
        digest = pull_again()
        assert "serving stale tag upstream=docker.io repository=library/alpine tag=3.19" in (
            log.text()
        )
        assert digest == alpine.digest
        assert ("HEAD", "/v2/library/alpine/manifests/3.19", 200, "STALE") in log.requests()

        # An upstream that answers 502 instead: only HEADs of the tag go out, no GET.
        up.upstream = f"http://127.0.0.1:{free_port()}"
        up.start()
        up.reset()
        time.sleep(1.2)
        pull_again()
        calls = upstream_calls(up)
        assert calls and set(calls) == {("HEAD", "/v2/library/alpine/manifests/3.19")}, calls
    finally:
        proxy.extra_args = saved_args
        proxy.restart()
        stack.reset_upstream()

    assert_tag_resolved_to_index(alpine, seen_digests, "docker pulls during the outage")
    assert set(seen_digests) == {alpine.digest}
    assert docker.repo_digests("alpine:3.19") == [f"alpine@{alpine.digest}"]
