"""One tag for every architecture, with real clients: the mysql story and per-arch tags.

A Docker daemon (``registry-mirrors``), podman (a ``registries.conf`` mirror) and containerd
(``ctr --hosts-dir``) pull through regproxy configured with the platform rules of the README.
Image IDs are the config digests, so ``docker image inspect`` says exactly which build arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.clients import Dockerd, Podman, write_hosts_toml
from tests.harness.front import Front
from tests.harness.images import SeededRegistry
from tests.harness.proxyproc import ProxyProcess
from tests.test_platforms import RULES

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def proxy(
    seeded_registry: SeededRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    base = tmp_path_factory.mktemp("platforms-e2e")
    config = base / "regproxy.yml"
    config.write_text(RULES)
    front = Front(seeded_registry.registry)
    front.start()
    proc = ProxyProcess(front.url, base / "storage", extra_args=["--config", str(config)])
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        front.stop()


@pytest.fixture(scope="module")
def dockerd(proxy: ProxyProcess) -> Iterator[Dockerd]:
    with Dockerd([proxy.url]) as d:
        yield d


@pytest.fixture
def docker(dockerd: Dockerd) -> Dockerd:
    dockerd.rmi_all()
    return dockerd


def test_mysql_story_with_docker(
    docker: Dockerd, proxy: ProxyProcess, seeded_registry: SeededRegistry
) -> None:
    mysql = seeded_registry["library/mysql:5.7"]
    server = seeded_registry["mysql/mysql-server:5.7"]
    # without the rule: Docker Hub's list has no arm64 entry
    plain = proxy.extra_args
    proxy.extra_args = []
    proxy.restart()
    try:
        result = docker.pull("mysql:5.7", platform="linux/arm64", check=False)
        assert result.returncode != 0
        # dockerd then falls back to Docker Hub (refused here); the mirror's answer is in its log
        assert "no matching manifest for linux/arm64" in docker.logs()
    finally:
        proxy.extra_args = plain
        proxy.restart()
    # with the rule: one tag, both architectures
    docker.pull("mysql:5.7", platform="linux/arm64")
    assert docker.inspect_arch("mysql:5.7") == ("linux", "arm64", "v8")
    assert docker.image_id("mysql:5.7") == server.child("linux/arm64/v8").config_digest
    docker.rmi_all()
    docker.pull("mysql:5.7", platform="linux/amd64")
    assert docker.inspect_arch("mysql:5.7")[:2] == ("linux", "amd64")
    assert docker.image_id("mysql:5.7") == mysql.child("linux/amd64").config_digest


@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64/v8"])
def test_per_arch_tags_with_docker(
    docker: Dockerd, seeded_registry: SeededRegistry, platform: str
) -> None:
    image = seeded_registry[f"myteam/app:1.0-{platform.split('/')[1]}"]
    docker.pull("myteam/app:1.0", platform="/".join(platform.split("/")[:2]))
    assert docker.image_id("myteam/app:1.0") == image.child(platform).config_digest


def test_per_arch_tags_with_podman(proxy: ProxyProcess, seeded_registry: SeededRegistry) -> None:
    with Podman([proxy.host]) as podman:
        for arch, variant, platform in (
            ("amd64", None, "linux/amd64"),
            ("arm64", "v8", "linux/arm64/v8"),
        ):
            image = seeded_registry[f"myteam/app:1.0-{arch}"]
            podman.pull("docker.io/myteam/app:1.0", arch=arch, variant=variant)
            assert podman.image_id("docker.io/myteam/app:1.0") == (
                image.child(platform).config_digest.removeprefix("sha256:")
            )
            assert podman.inspect_arch("docker.io/myteam/app:1.0")[1] == arch


def test_per_arch_tags_with_containerd(
    dockerd: Dockerd, proxy: ProxyProcess, seeded_registry: SeededRegistry, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "docker.io", proxy.url)
    for platform in ("linux/amd64", "linux/arm64/v8"):
        image = seeded_registry[f"myteam/app:1.0-{platform.split('/')[1]}"]
        dockerd.ctr_rmi_all()
        dockerd.ctr_pull("docker.io/myteam/app:1.0", hosts, platform=platform)
        content = set(dockerd.ctr_content())
        child = image.child(platform)
        assert {child.digest, child.config_digest, *child.layers} <= content
