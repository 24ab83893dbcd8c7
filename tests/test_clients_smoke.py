"""Smoke tests of the real-client harness, with distribution's own pull-through cache as mirror.

Topology (all on 127.0.0.1, no internet)::

    docker / podman / ctr  ->  docker-registry (proxy: remoteurl)  ->  docker-registry (upstream)
                               "mirror", access log checked            holds library/testimg:1

The image is a tiny real multi-platform OCI index (linux/amd64, linux/arm64/v8, linux/arm/v7)
built here. Every client runs with the offline guard (``HTTPS_PROXY`` at a refusing loopback
port), so a pull that succeeds cannot have gone anywhere but the mirror; the mirror's access
log shows it too.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import re
import socket
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.clients import (
    CommandFailed,
    Dockerd,
    Podman,
    remove_tree,
    require_tool,
    skopeo_copy_all,
    skopeo_inspect,
    skopeo_push_oci,
    write_hosts_toml,
)

pytestmark = pytest.mark.e2e

PLATFORMS = [("linux", "amd64", ""), ("linux", "arm64", "v8"), ("linux", "arm", "v7")]
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "")


# --------------------------------------------------------------------------- test image


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def build_oci_layout(directory: Path, tag: str = "1") -> str:
    """Write a multi-platform OCI image layout; return the index digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(b: bytes) -> dict[str, object]:
        d = _digest(b)
        (blobs / d[7:]).write_bytes(b)
        return {"digest": d, "size": len(b)}

    manifests = []
    for os_, arch, variant in PLATFORMS:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            data = f"{os_}/{arch}/{variant}\n".encode()
            info = tarfile.TarInfo("platform.txt")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
        layer = gzip.compress(raw.getvalue(), mtime=0)
        plat = {"architecture": arch, "os": os_} | ({"variant": variant} if variant else {})
        config = plat | {
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(raw.getvalue())]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "regproxy tests"}],
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}
            | put(json.dumps(config).encode()),
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"} | put(layer)],
        }
        manifests.append(
            {"mediaType": manifest["mediaType"]}
            | put(json.dumps(manifest).encode())
            | {"platform": plat}
        )
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    ref = {"mediaType": index["mediaType"]} | put(json.dumps(index).encode())
    ref["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": index["mediaType"], "manifests": [ref]})
    )
    return str(ref["digest"])


# --------------------------------------------------------------------------- stand-in mirror


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d+) \S+ "[^"]*" '
    r'"(?P<ua>[^"]*)"'
)


class Distribution:
    """One ``docker-registry serve`` (distribution 2.8) on a free loopback port."""

    def __init__(self, root: Path, remote: str | None = None) -> None:
        root.mkdir(parents=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "registry.log"
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "regproxy-tests"},
        }
        if remote:
            config["proxy"] = {"remoteurl": remote}
        (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [require_tool("docker-registry"), "serve", str(root / "config.yml")],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def requests_since(self, mark: int) -> list[tuple[str, str, int, str]]:
        """(method, uri, status, user-agent) of the access-log lines written after ``mark``."""
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return [(m["method"], m["uri"], int(m["status"]), m["ua"]) for m in _ACCESS.finditer(text)]


@dataclass
class Mirror:
    upstream: Distribution
    mirror: Distribution
    index_digest: str

    @property
    def host(self) -> str:
        return self.mirror.url.removeprefix("http://")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    base = tmp_path_factory.mktemp("clients")
    layout = base / "layout"
    index_digest = build_oci_layout(layout)
    upstream = Distribution(base / "upstream")
    try:
        skopeo_push_oci(layout, f"127.0.0.1:{upstream.port}/library/testimg:1", layout_ref="1")
        # distribution's proxy mode panics at start-up unless the upstream answers already
        proxy = Distribution(base / "mirror", remote=upstream.url)
    except BaseException:
        upstream.stop()
        raise
    try:
        yield Mirror(upstream, proxy, index_digest)
    finally:
        proxy.stop()
        upstream.stop()


@pytest.fixture(scope="module")
def dockerd(mirror: Mirror) -> Iterator[Dockerd]:
    with Dockerd([mirror.mirror.url]) as d:
        yield d


def _uris(reqs: list[tuple[str, str, int, str]], method: str = "GET") -> list[str]:
    return [uri for m, uri, status, _ in reqs if m == method and status < 400]


# --------------------------------------------------------------------------- tests


def test_upstream_holds_the_index(mirror: Mirror) -> None:
    raw = skopeo_inspect(
        f"{mirror.upstream.url}/library/testimg:1".removeprefix("http://"), raw=True
    )
    assert _digest(raw.encode()) == mirror.index_digest
    assert len(json.loads(raw)["manifests"]) == len(PLATFORMS)


def test_docker_pulls_through_mirror(dockerd: Dockerd, mirror: Mirror) -> None:
    dockerd.rmi_all()
    mark = mirror.mirror.mark()
    dockerd.pull("testimg:1")
    if HOST_ARCH:
        assert dockerd.inspect_arch("testimg:1")[:2] == ("linux", HOST_ARCH)
    # dockerd 20.10 keeps familiar names: "testimg@sha256:..."
    assert f"testimg@{mirror.index_digest}" in dockerd.repo_digests("testimg:1")
    reqs = mirror.mirror.requests_since(mark)
    got = _uris(reqs)
    assert any(u.startswith("/v2/library/testimg/blobs/") for u in got), reqs
    assert any(u.startswith("/v2/library/testimg/manifests/") for u in got), reqs
    assert all(ua.startswith("docker/") for *_, ua in reqs if ua), reqs
    assert "Trying to pull testimg from http://127.0.0.1" in dockerd.logs()

    amd64_id = dockerd.image_id("testimg:1")
    dockerd.pull("testimg:1", platform="linux/arm64")
    assert dockerd.inspect_arch("testimg:1") == ("linux", "arm64", "v8")
    assert dockerd.image_id("testimg:1") != amd64_id
    # the tag moved; the first image stays, dangling
    assert amd64_id in dockerd.image_ids()


def test_docker_rmi_all_makes_the_next_pull_cold(dockerd: Dockerd, mirror: Mirror) -> None:
    dockerd.pull("testimg:1", platform="linux/arm/v7")
    dockerd.rmi_all()
    assert dockerd.image_ids() == []
    mark = mirror.mirror.mark()
    dockerd.pull("testimg:1", platform="linux/arm/v7")
    assert dockerd.inspect_arch("testimg:1") == ("linux", "arm", "v7")
    blobs = [u for u in _uris(mirror.mirror.requests_since(mark)) if "/blobs/" in u]
    assert len(set(blobs)) == 2, blobs  # config + the one layer, downloaded again


def test_docker_without_a_working_mirror_fails_fast(mirror: Mirror) -> None:
    # A mirror port nobody listens on: dockerd falls back to Docker Hub, which the offline
    # guard refuses at once. The error names Hub, not the mirror.
    dead = f"http://127.0.0.1:{_free_port()}"
    with Dockerd([dead]) as d:
        t0 = time.monotonic()
        r = d.pull("testimg:1", check=False, timeout=120)
        elapsed = time.monotonic() - t0
        assert r.returncode != 0
        assert "registry-1.docker.io" in r.stderr or "index.docker.io" in r.stderr, r.stderr
        assert elapsed < 30, elapsed
        with pytest.raises(CommandFailed, match=r"registry-1\.docker\.io|index\.docker\.io"):
            d.pull("testimg:1", timeout=120)
        base = d.base
        assert base is not None
    assert not base.exists()


def test_ctr_pulls_through_mirror_with_hosts_dir(
    dockerd: Dockerd, mirror: Mirror, tmp_path: Path
) -> None:
    hosts = tmp_path / "certs.d"
    path = write_hosts_toml(hosts, "docker.io", mirror.mirror.url)
    assert path == hosts / "docker.io" / "hosts.toml"
    dockerd.ctr_rmi_all()
    mark = mirror.mirror.mark()
    dockerd.ctr_pull("docker.io/library/testimg:1", hosts, platform="linux/arm64")
    assert dockerd.ctr_images() == ["docker.io/library/testimg:1"]
    reqs = mirror.mirror.requests_since(mark)
    assert all(uri.endswith("?ns=docker.io") for _, uri, _, _ in reqs), reqs
    got = [u.split("?")[0] for u in _uris(reqs)]
    index = json.loads(skopeo_inspect(f"{mirror.host}/library/testimg:1", raw=True))
    arm64 = next(m for m in index["manifests"] if m["platform"]["architecture"] == "arm64")
    content = dockerd.ctr_content()
    assert mirror.index_digest in content and arm64["digest"] in content
    assert any(u.startswith("/v2/library/testimg/blobs/") for u in got), reqs
    # only the arm64 image was fetched: two blobs (config + layer)
    assert len({u for u in got if "/blobs/" in u}) == 2, reqs
    dockerd.ctr_rmi_all()
    assert dockerd.ctr_content() == []


def test_podman_pulls_through_mirror(mirror: Mirror) -> None:
    with Podman([mirror.mirror.url]) as p:
        mark = mirror.mirror.mark()
        p.pull("docker.io/library/testimg:1")
        if HOST_ARCH:
            assert p.inspect_arch("docker.io/library/testimg:1")[:2] == ("linux", HOST_ARCH)
        p.pull("docker.io/library/testimg:1", arch="arm64")
        assert p.inspect_arch("docker.io/library/testimg:1") == ("linux", "arm64", "v8")
        p.pull("testimg:1", arch="arm", variant="v7")  # short name via search registries
        assert p.inspect_arch("docker.io/library/testimg:1") == ("linux", "arm", "v7")
        reqs = mirror.mirror.requests_since(mark)
        assert any(u.startswith("/v2/library/testimg/blobs/") for u in _uris(reqs)), reqs
        assert all(ua.startswith("containers/") for *_, ua in reqs if ua), reqs
        p.rmi_all()
        assert p.image_ids() == []
        base = p.base
    assert not base.exists()


def test_skopeo_copy_all_from_mirror(mirror: Mirror, tmp_path: Path) -> None:
    skopeo_copy_all(f"{mirror.host}/library/testimg:1", tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "index.json").read_text())
    (top,) = index["manifests"]
    assert top["digest"] == mirror.index_digest


def test_dockerd_stop_leaves_nothing_behind(mirror: Mirror) -> None:
    d = Dockerd([mirror.mirror.url]).start()
    base = d.base
    assert base is not None and len(str(d.containerd_address)) < 60
    d.pull("testimg:1")
    d.stop()
    assert not base.exists()
    assert not any(
        str(base) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    assert "Daemon shutdown complete" in d.logs() or "stopping" in d.logs().lower()
    remove_tree(base)  # idempotent
