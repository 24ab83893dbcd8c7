"""One tag for every architecture: synthesis, cross-repository children, list-unaware clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.platforms.rules import Platform, accepts_index, platform_from_user_agent
from tests.harness.front import Front
from tests.harness.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SeededRegistry,
    seed_image,
)
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry
from tests.test_read_path import error_code, fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]

RULES = """
platforms:
  default: linux/amd64
  rules:
    - repository: library/mysql
      tags: ["5.7", "5.7.*"]
      sources:
        linux/arm64/v8: mysql/mysql-server:{tag}
    - repository: myteam/*
      sources:
        linux/amd64: "{repository}:{tag}-amd64"
        linux/arm64/v8: "{repository}:{tag}-arm64"
"""
DOCKER_UA = "docker/20.10.24 go/go1.19 git-commit/5d6db84 kernel/6.1 os/linux arch/{arch}"
SINGLE_ACCEPT = f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"


def write_config(tmp_path: Path, text: str = RULES) -> Path:
    path = tmp_path / "regproxy.yml"
    path.write_text(text)
    return path


@pytest.fixture
def upstream(seeded_registry: SeededRegistry, front: FrontFactory) -> Front:
    return front(seeded_registry.registry)


@pytest.fixture
def proxy(upstream: Front, proxy_factory: ProxyFactory, tmp_path: Path) -> ProxyProcess:
    return proxy_factory(upstream.url, extra_args=["--config", str(write_config(tmp_path))])


def platforms_of(index: bytes) -> dict[str, str]:
    doc = json.loads(index)
    result = {}
    for entry in doc["manifests"]:
        p = Platform.from_json(entry.get("platform"))
        result[str(p)] = entry["digest"]
    return result


async def test_synthesized_index_adds_the_missing_platform(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    mysql = seeded_registry["library/mysql:5.7"]
    server = seeded_registry["mysql/mysql-server:5.7"]
    status, headers, body = await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7")
    assert status == 200
    doc = json.loads(body)
    assert doc["mediaType"] == OCI_INDEX == headers["Content-Type"]  # an OCI child is in it
    assert headers["Docker-Content-Digest"] == sha256(body)
    assert platforms_of(body) == {
        "linux/amd64": mysql.child("linux/amd64").digest,  # upstream's own entry wins
        "linux/arm64/v8": server.child("linux/arm64/v8").digest,  # from mysql/mysql-server
    }
    # the upstream's own entry is kept as it was, byte for byte
    assert doc["manifests"][0] == json.loads(mysql.raw)["manifests"][0]
    # stable: same bytes again, and by digest
    assert (await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7"))[2] == body
    status, headers, by_digest = await fetch(
        f"{proxy.url}/v2/library/mysql/manifests/{sha256(body)}"
    )
    assert (status, by_digest) == (200, body)
    status, headers, _ = await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7", "HEAD")
    assert headers["Docker-Content-Digest"] == sha256(body)
    assert headers["Content-Length"] == str(len(body))
    # and across a restart
    proxy.restart()
    assert (await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7"))[2] == body


async def test_children_and_blobs_served_across_repositories(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    server = seeded_registry["mysql/mysql-server:5.7"]
    child = server.child("linux/arm64/v8")
    await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7")
    upstream.reset()
    status, headers, body = await fetch(f"{proxy.url}/v2/library/mysql/manifests/{child.digest}")
    assert (status, body, headers["Content-Type"]) == (200, child.raw, DOCKER_MANIFEST)
    for digest in (child.config_digest, *child.layers):
        status, _, data = await fetch(f"{proxy.url}/v2/library/mysql/blobs/{digest}")
        assert (status, data) == (200, server.blobs[digest])
    paths = [r.path for r in upstream.requests if r.method == "GET"]
    assert paths and all(p.startswith("/v2/mysql/mysql-server/") for p in paths), paths
    # the mapping is on disk: a restarted proxy with a cold blob still finds the source
    proxy.restart()
    status, _, data = await fetch(f"{proxy.url}/v2/library/mysql/blobs/{child.layers[0]}")
    assert data == server.blobs[child.layers[0]]


async def test_per_arch_tags_become_one_tag(
    proxy: ProxyProcess, seeded_registry: SeededRegistry
) -> None:
    amd = seeded_registry["myteam/app:1.0-amd64"]
    arm = seeded_registry["myteam/app:1.0-arm64"]
    status, headers, body = await fetch(f"{proxy.url}/v2/myteam/app/manifests/1.0")
    assert status == 200
    assert platforms_of(body) == {"linux/amd64": amd.digest, "linux/arm64/v8": arm.digest}
    status, _, child = await fetch(f"{proxy.url}/v2/myteam/app/manifests/{arm.digest}")
    assert child == arm.raw
    # a tag no source has
    status, _, body = await fetch(f"{proxy.url}/v2/myteam/app/manifests/9.9")
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"


async def test_tags_without_rule_pass_through(
    proxy: ProxyProcess, seeded_registry: SeededRegistry
) -> None:
    alpine = seeded_registry["library/alpine:3.19"]
    status, _, body = await fetch(f"{proxy.url}/v2/library/alpine/manifests/3.19")
    assert body == alpine.raw
    # a rule whose sources are all provided upstream already: upstream's own bytes
    redis = seeded_registry["library/redis:7"]
    assert (await fetch(f"{proxy.url}/v2/library/redis/manifests/7"))[2] == redis.raw


@pytest.mark.parametrize(
    ("user_agent", "platform"),
    [
        (DOCKER_UA.format(arch="arm64"), "linux/arm64/v8"),
        (DOCKER_UA.format(arch="amd64"), "linux/amd64"),
        ("containerd/1.6", "linux/amd64"),
    ],
)
async def test_list_unaware_client_gets_its_platform(
    proxy: ProxyProcess, seeded_registry: SeededRegistry, user_agent: str, platform: str
) -> None:
    mysql = seeded_registry["library/mysql:5.7"]
    server = seeded_registry["mysql/mysql-server:5.7"]
    expected = mysql.child(platform) if platform == "linux/amd64" else server.child(platform)
    headers = {"Accept": SINGLE_ACCEPT, "User-Agent": user_agent}
    status, got, body = await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7", headers=headers)
    assert (status, body) == (200, expected.raw)
    assert got["Docker-Content-Digest"] == expected.digest


async def test_list_unaware_client_without_match(
    proxy: ProxyProcess, seeded_registry: SeededRegistry
) -> None:
    headers = {"Accept": SINGLE_ACCEPT, "User-Agent": DOCKER_UA.format(arch="s390x")}
    status, _, body = await fetch(f"{proxy.url}/v2/library/alpine/manifests/3.19", headers=headers)
    assert status == 404
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["detail"]["available"] == ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"]


async def test_resynthesis_when_a_source_moves(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    seed_image(registry, "library/mysql", "5.7", platforms=("linux/amd64",))
    seed_image(registry, "mysql/mysql-server", "5.7", platforms=("linux/arm64/v8",))
    upstream = front(registry)
    proxy = proxy_factory(
        upstream.url, extra_args=["--config", str(write_config(tmp_path)), "--tag-ttl", "1s"]
    )
    first = (await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7"))[2]
    moved = seed_image(registry, "mysql/mysql-server", "5.7", platforms=("linux/arm64/v8",))
    assert (await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7"))[2] == first  # within TTL
    await asyncio.sleep(1.2)
    second = (await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7"))[2]
    assert second != first
    assert platforms_of(second)["linux/arm64/v8"] == moved.child("linux/arm64/v8").digest
    # upstream gone: the last synthesized index is served stale
    registry.stop()
    await asyncio.sleep(1.2)
    status, headers, stale = await fetch(f"{proxy.url}/v2/library/mysql/manifests/5.7")
    assert (status, stale) == (200, second)


async def test_inspect_and_warm_then_upstream_cut(
    proxy: ProxyProcess, upstream: Front, seeded_registry: SeededRegistry
) -> None:
    server = seeded_registry["mysql/mysql-server:5.7"]
    mysql = seeded_registry["library/mysql:5.7"]
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "inspect", "mysql:5.7", "--proxy", proxy.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["platform"]: row for row in json.loads(result.stdout)}
    assert rows["linux/amd64"]["source"] == "upstream"
    assert rows["linux/amd64"]["digest"] == mysql.child("linux/amd64").digest
    assert rows["linux/arm64/v8"]["source"] == "docker.io/mysql/mysql-server:5.7"
    assert rows["linux/arm64/v8"]["digest"] == server.child("linux/arm64/v8").digest
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "warm", "mysql:5.7", "--proxy", proxy.url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    totals = json.loads(result.stdout)
    assert totals["manifests"] == 3  # the index and two children
    upstream.upstream = "http://127.0.0.1:9"  # cut off: nothing listens there
    for image, platform in ((mysql, "linux/amd64"), (server, "linux/arm64/v8")):
        child = image.child(platform)
        status, _, raw = await fetch(f"{proxy.url}/v2/library/mysql/manifests/{child.digest}")
        assert (status, raw) == (200, child.raw)
        for digest in (child.config_digest, *child.layers):
            status, _, data = await fetch(f"{proxy.url}/v2/library/mysql/blobs/{digest}")
            assert (status, data) == (200, image.blobs[digest])


def test_warm_failure_is_one_line(proxy: ProxyProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "warm", "nosuch/image:1", "--proxy", proxy.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "MANIFEST_UNKNOWN" in result.stderr


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        ("platforms: {default: linux}\n", "platforms.default"),
        (
            "platforms: {rules: [{repository: a, sources: {linux/arm64/v8/x/y: b:1}}]}\n",
            "platforms.rules[0].sources.linux/arm64/v8/x/y",
        ),
        (
            "platforms: {rules: [{repository: 'a[', sources: {linux/amd64: b:1}}]}\n",
            "platforms.rules[0].repository",
        ),
        (
            "platforms: {rules: [{repository: a, sources: {linux/amd64: '{repo}:{tag}'}}]}\n",
            "platforms.rules[0].sources.linux/amd64",
        ),
        (
            "platforms: {rules: [{repository: a, sources: {linux/amd64: 'UPPER:{tag}'}}]}\n",
            "platforms.rules[0].sources.linux/amd64",
        ),
        ("platforms: {rules: [{repository: a}]}\n", "platforms.rules[0].sources"),
    ],
)
def test_bad_rules_stop_start_up(tmp_path: Path, rules: str, key: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(write_config(tmp_path, rules))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"regproxy: configuration error: {key}:"), result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/aarch64", "linux/arm64/v8"),
        ("linux/amd64/v3", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/v6", "linux/arm/v6"),
    ],
)
def test_platform_normalization(text: str, normal: str) -> None:
    assert str(Platform.parse(text)) == normal


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", True),
        ("*/*", True),
        (SINGLE_ACCEPT, False),
        (f"{SINGLE_ACCEPT}, {OCI_INDEX}", True),
        (f"{DOCKER_MANIFEST};q=0.9, */*", True),
        ("application/json", True),
    ],
)
def test_accepts_index(accept: str, expected: bool) -> None:
    assert accepts_index(accept) is expected


def test_user_agent_hint() -> None:
    assert platform_from_user_agent(DOCKER_UA.format(arch="arm64")) == Platform.parse("linux/arm64")
    assert platform_from_user_agent("containerd/1.6.20+unknown") is None
