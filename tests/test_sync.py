"""Scheduled sync (``sync:``): chosen tags are in the cache before any client asks.

Against the real upstream (distribution 2.8 behind the counting front): the proxy polls with a
1 s interval; the tests push images upstream and check what lands on the proxy's disk without a
single client request, then that a pull asks upstream nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from proxy.config import ConfigError, load_config
from tests import test_operations as operations
from tests.harness.front import Front, Status, manifest, too_many_requests
from tests.harness.images import SeededImage, build_image, push_image, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.test_operations import metrics, value
from tests.test_read_path import fetch, sha256

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]

INTERVAL = 1.0
#: Time for a check to come round and finish on a busy 2-core machine.
SLACK = 15.0
REPO = "library/warm"
CHOSEN = ("linux/amd64", "linux/arm64/v8")


def write_config(path: Path, entries: list[dict[str, Any]], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"sync": entries, **extra}))
    return path


def sync_proxy(
    proxy_factory: ProxyFactory, upstream: Front, tmp_path: Path, *args: str, **kwargs: Any
) -> ProxyProcess:
    entry = {"repository": REPO, "tags": ["1.*"], "platforms": list(CHOSEN), "interval": "1s"}
    config = write_config(tmp_path / f"sync-{len(list(tmp_path.iterdir()))}.yml", [entry])
    return proxy_factory(upstream.url, extra_args=["--config", str(config), *args], **kwargs)


def content_file(storage: Path, kind: str, digest: str) -> Path:
    hexpart = digest.removeprefix("sha256:")
    return storage / kind / "sha256" / hexpart[:2] / hexpart


def held(storage: Path, kind: str, digest: str) -> bool:
    return content_file(storage, kind, digest).is_file()


def chosen_content(image: SeededImage) -> tuple[list[str], list[str]]:
    """(manifests, blobs) a pull of the chosen platforms needs."""
    manifests = [image.digest] + [image.child(p).digest for p in CHOSEN]
    blobs = [d for p in CHOSEN for d in (image.child(p).config_digest, *image.child(p).layers)]
    return manifests, blobs


def holds_all(storage: Path, image: SeededImage) -> bool:
    manifests, blobs = chosen_content(image)
    return all(held(storage, "manifests", d) for d in manifests) and all(
        held(storage, "blobs", d) for d in blobs
    )


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll (bounded); return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within:.0f}s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def pull_chosen(proxy: ProxyProcess, image: SeededImage) -> None:
    """Pull the index and every chosen platform like a client; check every byte."""
    base = f"{proxy.url}/v2/{image.repository}"
    status, headers, body = await fetch(f"{base}/manifests/{image.tag}")
    assert (status, body) == (200, image.raw)
    for platform in CHOSEN:
        child = image.child(platform)
        status, _, body = await fetch(f"{base}/manifests/{child.digest}")
        assert (status, body) == (200, child.raw)
        for digest in (child.config_digest, *child.layers):
            status, headers, data = await fetch(f"{base}/blobs/{digest}")
            assert status == 200 and sha256(data) == digest
            assert headers["X-Cache"] == "HIT"


async def sync_status(proxy: ProxyProcess) -> dict[str, Any]:
    status, _, body = await fetch(f"{proxy.url}/_regproxy/sync")
    assert status == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


def synced_digest(doc: dict[str, Any], tag: str) -> str | None:
    (entry,) = doc["entries"]
    found = [t["digest"] for t in entry["tags"] if t["tag"] == tag]
    assert entry["digests"].get(tag) == (found[0] if found else None)
    return found[0] if found else None


# -- fetched ahead ---------------------------------------------------------------------------


async def test_sync_fetches_chosen_platforms_ahead_and_a_pull_asks_upstream_nothing(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = front(registry)
    proxy = sync_proxy(proxy_factory, upstream, tmp_path)
    storage = proxy.storage
    platforms = (*CHOSEN, "linux/arm/v7")
    image = seed_image(registry, REPO, "1.0", platforms=platforms, layer_sizes=(40_000, 9000))
    other = seed_image(registry, REPO, "2.0", platforms=platforms)  # matches no glob

    took = await wait_for(lambda: holds_all(storage, image), INTERVAL + SLACK, "synced ahead")
    # The platform left out, and the tag no glob matches, were not fetched.
    unwanted = image.child("linux/arm/v7")
    assert not held(storage, "manifests", unwanted.digest)
    assert not any(held(storage, "blobs", d) for d in unwanted.layers)
    assert upstream.count(path_contains="/manifests/2.0") == 0
    assert not held(storage, "manifests", other.digest)
    # Resolution is a HEAD: the tag itself was never GET upstream (Docker Hub counts GETs).
    assert upstream.count("GET", "/manifests/1.0") == 0
    assert upstream.count("HEAD", "/manifests/1.0") >= 1
    # Each blob came from upstream once.
    _, blobs = chosen_content(image)
    assert all(upstream.count("GET", f"/blobs/{d}") == 1 for d in blobs)

    upstream.reset()
    await pull_chosen(proxy, image)
    assert upstream.requests == [], [(r.method, r.path) for r in upstream.requests]

    doc = await sync_status(proxy)
    assert synced_digest(doc, "1.0") == image.digest
    assert synced_digest(doc, "2.0") is None
    (entry,) = doc["entries"]
    assert entry["last_result"] == "success" and entry["next_run"] > entry["last_run"]
    assert f"digest={image.digest}" in proxy.logs()

    # A new image under the same tag is fetched ahead too.
    newer = seed_image(registry, REPO, "1.0", platforms=platforms, layer_sizes=(30_000,))
    await wait_for(lambda: holds_all(storage, newer), INTERVAL + SLACK, "new digest synced")
    await wait_for(lambda: synced_digest(status_now(proxy), "1.0") == newer.digest, 5, "status")
    upstream.reset()
    await pull_chosen(proxy, newer)
    assert upstream.requests == []

    m = await metrics(proxy)
    assert value(m, "regproxy_sync_runs_total", result="success") >= 2
    _, new_blobs = chosen_content(newer)
    fetched = sum(len((image.blobs | newer.blobs)[d]) for d in {*blobs, *new_blobs})
    assert value(m, "regproxy_sync_bytes_total") >= fetched
    last = value(m, "regproxy_sync_last_success_timestamp_seconds", repository=f"docker.io/{REPO}")
    assert time.time() - 60 < last <= time.time()
    assert took < INTERVAL + SLACK


def status_now(proxy: ProxyProcess) -> dict[str, Any]:
    """The status document, from synchronous code (a wait_for predicate)."""
    with urllib.request.urlopen(f"{proxy.url}/_regproxy/sync", timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


async def test_sync_status_command(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = front(registry)
    image = seed_image(registry, REPO, "1.2", platforms=CHOSEN)
    proxy = sync_proxy(proxy_factory, upstream, tmp_path)
    await wait_for(lambda: holds_all(proxy.storage, image), INTERVAL + SLACK, "synced")
    await wait_for(lambda: synced_digest(status_now(proxy), "1.2") == image.digest, 5, "status")
    as_json = run_cli("sync", "status", "--proxy", proxy.url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert synced_digest(doc, "1.2") == image.digest
    table = run_cli("sync", "status", "--proxy", proxy.url)
    assert table.returncode == 0, table.stderr
    assert REPO in table.stdout and "1.2" in table.stdout
    assert image.digest.removeprefix("sha256:")[:12] in table.stdout
    refused = run_cli("sync", "status", "--proxy", "http://127.0.0.1:9")
    assert refused.returncode == 1 and "cannot reach" in refused.stderr


# -- rate limits -----------------------------------------------------------------------------


async def test_sync_backs_off_on_429_while_pulls_are_served(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = front(registry)
    image = seed_image(registry, REPO, "1.0", platforms=CHOSEN)
    proxy = sync_proxy(proxy_factory, upstream, tmp_path)
    await wait_for(lambda: holds_all(proxy.storage, image), INTERVAL + SLACK, "synced")

    limited = upstream.add_fault(
        manifest("1.0", "HEAD"), too_many_requests(retry_after=60), times=100
    )
    newer = seed_image(registry, REPO, "1.0", platforms=CHOSEN)
    upstream.reset()
    await wait_for(lambda: limited.applied >= 1, INTERVAL + SLACK, "a check met the 429")
    await asyncio.sleep(4 * INTERVAL)
    # One 429, then no request at all: sync waits out Retry-After instead of hammering.
    assert limited.applied == 1
    seen = upstream.requests
    first = next(i for i, r in enumerate(seen) if r.status == 429)
    assert [(r.method, r.path) for r in seen[first + 1 :]] == []
    assert upstream.count("GET", "/manifests/") == upstream.count("GET", "/blobs/") == 0
    assert not holds_all(proxy.storage, newer)
    m = await metrics(proxy)
    assert value(m, "regproxy_sync_runs_total", result="ratelimited") >= 2
    # Clients are still served what is cached.
    status, headers, body = await fetch(f"{proxy.url}/v2/{REPO}/manifests/1.0")
    assert (status, body) == (200, image.raw)
    doc = await sync_status(proxy)
    assert doc["entries"][0]["last_result"] == "ratelimited"


async def test_sync_leaves_the_last_pulls_to_clients(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = front(registry)
    proxy = sync_proxy(proxy_factory, upstream, tmp_path)
    image = build_image(REPO, "1.0", platforms=CHOSEN)

    def head_answer(remaining: int) -> Status:
        """Docker Hub's HEAD answer for the tag, with its rate-limit headers."""
        return Status(
            200,
            {
                "Docker-Content-Digest": image.digest,
                "Content-Type": image.media_type,
                "ratelimit-limit": "100;w=21600",
                "ratelimit-remaining": f"{remaining};w=21600",
            },
            image.raw,
        )

    low = upstream.add_fault(manifest("1.0", "HEAD"), head_answer(19), times=1000)
    push_image(registry, image)
    await wait_for(lambda: low.applied >= 3, 3 * INTERVAL + SLACK, "checks under the floor")
    # 19 of 100 is under the default floor (20%): resolved with HEADs, nothing fetched.
    assert upstream.count("GET", "/manifests/") == 0
    assert upstream.count("GET", "/blobs/") == 0
    doc = await sync_status(proxy)
    assert doc["entries"][0]["last_result"] == "ratelimited"
    assert "below the sync floor" in doc["entries"][0]["error"]
    # A client pull still goes through, with the headroom sync left.
    await pull_any_platform(proxy, image)

    # Headroom again (21 of 100): sync fetches the rest.
    upstream.clear_faults()
    upstream.add_fault(manifest("1.0", "HEAD"), head_answer(21), times=1000)
    await wait_for(lambda: holds_all(proxy.storage, image), INTERVAL + SLACK, "synced")


async def pull_any_platform(proxy: ProxyProcess, image: SeededImage) -> None:
    base = f"{proxy.url}/v2/{image.repository}"
    status, _, body = await fetch(f"{base}/manifests/{image.tag}")
    assert (status, body) == (200, image.raw)
    child = image.child(CHOSEN[0])
    status, _, body = await fetch(f"{base}/manifests/{child.digest}")
    assert (status, body) == (200, child.raw)
    for digest in (child.config_digest, *child.layers):
        status, _, data = await fetch(f"{base}/blobs/{digest}")
        assert status == 200 and sha256(data) == digest


# -- replicas --------------------------------------------------------------------------------


async def test_two_replicas_sync_each_entry_once(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    upstream = front(registry)
    volume = tmp_path / "volume"
    args = ("--redis", redis_server.url)
    image = seed_image(registry, REPO, "1.0", platforms=CHOSEN, layer_sizes=(50_000, 20_000))
    started = time.monotonic()
    a = sync_proxy(proxy_factory, upstream, tmp_path, *args, storage=volume)
    b = sync_proxy(proxy_factory, upstream, tmp_path, *args, storage=volume)
    await wait_for(lambda: holds_all(volume, image), INTERVAL + SLACK, "synced")
    await asyncio.sleep(3 * INTERVAL)
    elapsed = time.monotonic() - started

    manifests, blobs = chosen_content(image)
    for digest in blobs:
        assert upstream.count("GET", f"/blobs/{digest}") == 1, digest
    for digest in manifests[1:]:
        assert upstream.count("GET", f"/manifests/{digest}") == 1, digest
    # One replica checks per interval (the lease), not both: each check lists the tags once,
    # and there are about as many lists as intervals, not twice as many.
    checks = upstream.count("GET", "/tags/list")
    assert 1 <= checks <= elapsed / (INTERVAL * 0.8) + 2, (checks, elapsed)
    assert upstream.count("HEAD", "/manifests/1.0") <= checks
    skipped = [
        value(await metrics(p), "regproxy_sync_runs_total", result="skipped") for p in (a, b)
    ]
    assert sum(skipped) >= 1
    # Both replicas report the check, whichever made it.
    for proxy in (a, b):
        assert synced_digest(await sync_status(proxy), "1.0") == image.digest
    upstream.reset()
    await pull_chosen(b, image)
    await pull_chosen(a, image)
    assert upstream.requests == []


# -- configuration ---------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return operations.run_cli(*args, check=False, timeout=60)


def test_bad_entries_stop_start_up_with_one_line_naming_them(tmp_path: Path) -> None:
    cases = [
        ({"repository": "ghcr.io/org/app"}, "sync[0].repository", "ghcr.io"),
        ({"repository": "Not/A Name"}, "sync[0].repository", "Not/A Name"),
        ({"repository": "library/alpine", "tags": ["3.[0-9"]}, "sync[0].tags", "library/alpine"),
        ({"repository": "library/alpine", "interval": "soon"}, "sync[0].interval", "alpine"),
        ({"repository": "library/alpine", "platforms": ["linux"]}, "sync[0].platforms", "alpine"),
    ]
    for entry, key, named in cases:
        config = write_config(tmp_path / "bad.yml", [entry])
        proc = run_cli("serve", "--config", str(config), "--listen", "127.0.0.1:0")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (entry, proc.stderr)
        assert len(lines) == 1 and key in lines[0] and named in lines[0], (entry, lines)


def test_sync_section_is_typed_and_routed_like_requests(tmp_path: Path) -> None:
    config_file = tmp_path / "sync.yml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "upstreams": {
                    "docker.io": {"url": "https://registry-1.docker.io"},
                    "ghcr.io": {"url": "https://ghcr.io"},
                },
                "platforms": {"default": "linux/arm64"},
                "sync": [
                    {"repository": "alpine", "tags": ["3", "3.*"], "interval": "10m"},
                    {"repository": "ghcr.io/org/app", "platforms": "all", "interval": "90s"},
                    {"repository": "docker.io/library/redis", "platforms": ["linux/amd64"]},
                ],
            }
        )
    )
    config = load_config(config_file=config_file, environ={})
    alpine, app, redis = config.sync.entries
    assert (alpine.upstream, alpine.repository, alpine.tags) == (
        "docker.io",
        "library/alpine",
        ("3", "3.*"),
    )
    assert alpine.platforms == ("linux/arm64/v8",)  # platforms.default, normalized
    assert alpine.interval == 600 and not alpine.literal_tags
    assert (app.upstream, app.repository, app.platforms, app.interval) == (
        "ghcr.io",
        "org/app",
        None,
        90,
    )
    assert app.tags == ("latest",) and app.literal_tags
    assert (redis.upstream, redis.repository) == ("docker.io", "library/redis")
    # The floor: 20% of the limit by default; a fraction, a percentage or a count.
    assert config.sync.floor(100) == 20 and config.sync.floor(None) is None
    for written, limit, floor in (("0.5", 100, 50), ("10%", 200, 20), ("25", None, 25)):
        env = {"REGPROXY_SYNC_RATELIMIT_FLOOR": written}
        assert load_config(config_file=config_file, environ=env).sync.floor(limit) == floor
    with pytest.raises(ConfigError, match="sync_ratelimit_floor"):
        load_config(environ={"REGPROXY_SYNC_RATELIMIT_FLOOR": "lots"})
    assert load_config(environ={}).sync.entries == ()


async def test_sync_keeps_a_synthesized_index_warm(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A platform rule's index, children from another repository included, is synced ahead;
    when a source moves, the index is synthesized again and its new child fetched."""
    upstream = front(registry)
    config = write_config(
        tmp_path / "rules.yml",
        [{"repository": "library/mix", "tags": ["1.0"], "platforms": "all", "interval": "1s"}],
        platforms={
            "rules": [
                {
                    "repository": "library/mix",
                    "sources": {"linux/arm64/v8": "mixarm/server:{tag}"},
                }
            ]
        },
    )
    amd = seed_image(registry, "library/mix", "1.0", platforms=("linux/amd64",), single=True)
    arm = seed_image(registry, "mixarm/server", "1.0", platforms=("linux/arm64/v8",), single=True)
    proxy = proxy_factory(upstream.url, extra_args=["--config", str(config)])

    def synced(arm: SeededImage) -> bool:
        digests = [amd.digest, arm.digest]
        blobs = [*amd.blobs, *arm.blobs]
        return all(held(proxy.storage, "manifests", d) for d in digests) and all(
            held(proxy.storage, "blobs", d) for d in blobs
        )

    await wait_for(lambda: synced(arm), INTERVAL + SLACK, "synthesized index synced")
    await wait_for(lambda: synced_digest(status_now(proxy), "1.0") is not None, 5, "status")
    upstream.reset()
    await pull_synthesized(proxy, amd, arm, synced_digest(status_now(proxy), "1.0"))
    assert upstream.requests == [], [(r.method, r.path) for r in upstream.requests]

    newer = seed_image(registry, "mixarm/server", "1.0", platforms=("linux/arm64/v8",), single=True)
    await wait_for(lambda: synced(newer), INTERVAL + SLACK, "moved source synced")
    await wait_for(
        lambda: held(proxy.storage, "manifests", synced_digest(status_now(proxy), "1.0")),
        5,
        "new index",
    )
    upstream.reset()
    await pull_synthesized(proxy, amd, newer, synced_digest(status_now(proxy), "1.0"))
    assert upstream.requests == [], [(r.method, r.path) for r in upstream.requests]


async def pull_synthesized(
    proxy: ProxyProcess, amd: SeededImage, arm: SeededImage, digest: str | None
) -> None:
    base = f"{proxy.url}/v2/library/mix"
    status, headers, body = await fetch(f"{base}/manifests/1.0")
    assert status == 200 and headers["Docker-Content-Digest"] == digest
    children = {m["platform"]["architecture"]: m["digest"] for m in json.loads(body)["manifests"]}
    assert children == {"amd64": amd.digest, "arm64": arm.digest}
    for image in (amd, arm):
        status, _, body = await fetch(f"{base}/manifests/{image.digest}")
        assert (status, body) == (200, image.raw)
        for blob_digest in image.blobs:
            status, _, data = await fetch(f"{base}/blobs/{blob_digest}")
            assert status == 200 and sha256(data) == blob_digest


async def test_sync_of_a_single_manifest_survives_a_restart_without_refetching(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = front(registry)
    image = seed_image(registry, REPO, "1.5", platforms=("linux/arm64/v8",), single=True)
    proxy = sync_proxy(proxy_factory, upstream, tmp_path)

    def synced() -> bool:
        return held(proxy.storage, "manifests", image.digest) and all(
            held(proxy.storage, "blobs", d) for d in image.blobs
        )

    await wait_for(synced, INTERVAL + SLACK, "single manifest synced")
    await wait_for(lambda: synced_digest(status_now(proxy), "1.5") == image.digest, 5, "status")
    proxy.stop()
    # Made old while the proxy is down: the next check marks them used again (eviction order).
    files = [content_file(proxy.storage, "blobs", d) for d in image.blobs]
    files.append(content_file(proxy.storage, "manifests", image.digest))
    day_ago = time.time() - 86400
    for path in files:
        os.utime(path, (day_ago, day_ago))
    upstream.reset()
    proxy.start()
    await wait_for(
        lambda: synced_digest(status_now(proxy), "1.5") == image.digest, SLACK, "checked"
    )
    # After the restart the check found everything cached: HEADs only, nothing fetched or logged.
    assert upstream.count("GET", "/manifests/") == upstream.count("GET", "/blobs/") == 0
    assert upstream.count("HEAD", "/manifests/1.5") >= 1
    assert proxy.logs().count(f"digest={image.digest}") == 1
    assert all(path.stat().st_mtime > time.time() - 60 for path in files)
    status, _, body = await fetch(f"{proxy.url}/v2/{REPO}/manifests/1.5")
    assert (status, body) == (200, image.raw)


async def test_sync_status_needs_a_login_where_pulls_do(
    registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n")
    entry = {"repository": REPO, "tags": ["1.0"], "interval": "1h"}
    config = write_config(tmp_path / "auth.yml", [entry], auth={"htpasswd": str(htpasswd)})
    proxy = proxy_factory(registry.url, extra_args=["--config", str(config)])
    status, headers, body = await fetch(f"{proxy.url}/_regproxy/sync")
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    login = "Basic " + base64.b64encode(b"alice:secret").decode()
    status, _, body = await fetch(f"{proxy.url}/_regproxy/sync", headers={"Authorization": login})
    assert status == 200 and json.loads(body)["entries"][0]["repository"] == REPO
    # The command takes the login in the URL.
    authed = proxy.url.replace("http://", "http://alice:secret@")
    result = run_cli("sync", "status", "--proxy", authed, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["entries"][0]["tag_globs"] == ["1.0"]
    refused = run_cli("sync", "status", "--proxy", proxy.url)
    assert refused.returncode == 1 and "401" in refused.stderr
