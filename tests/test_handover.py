"""Hand-over: a replica that dies or stops mid-download cuts no client of the others.

Three replicas on one SeaweedFS bucket and one redis-server, no shared disk, the upstream behind a
counting :class:`Front` that drips the blob so its download takes seconds. The replica holding the
blob's lock is SIGKILLed while clients of the two others stream it through them; and all three
are restarted one at a time (SIGTERM) under a loop of pulls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from storage.redis import RedisCoordinator, connect
from tests.harness import proxyproc
from tests.harness.front import Drip, Front, blob
from tests.harness.images import SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.harness.seaweed import SeaweedS3
from tests.test_read_path import ACCEPT
from tests.test_s3 import blob_key, s3_proxy

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
MiB = 1024 * 1024


@dataclass
class Stream:
    """One client GET of a blob, read as it arrives."""

    url: str
    received: int = 0
    status: int | None = None
    digest: str | None = None
    error: str | None = None
    done_at: float | None = None
    sha: Any = field(default_factory=hashlib.sha256)

    async def run(self) -> None:
        try:
            async with (
                aiohttp.ClientSession(auto_decompress=False) as session,
                session.get(self.url) as resp,
            ):
                self.status = resp.status
                async for chunk in resp.content.iter_any():
                    self.sha.update(chunk)
                    self.received += len(chunk)
            self.digest = f"sha256:{self.sha.hexdigest()}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error = repr(exc)
        self.done_at = time.monotonic()


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def lock_owner(redis_server: RedisServer, digest: str) -> str | None:
    raw = redis.Redis.from_url(redis_server.url).get(f"regproxy:lock:blob:{digest}")
    return None if raw is None else str(json.loads(raw)["url"])


def fleet(
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    bucket: str,
    upstream: Front,
    redis_server: RedisServer,
    tmp_path: Path,
    *args: str,
) -> list[ProxyProcess]:
    """Three replicas on ``bucket`` and Redis, started at once (each takes seconds)."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return list(
            pool.map(
                lambda i: s3_proxy(
                    proxy_factory,
                    seaweed,
                    bucket,
                    upstream.url,
                    tmp_path / f"w{i}",
                    "--redis",
                    redis_server.url,
                    *args,
                ),
                range(3),
            )
        )


@pytest.mark.parametrize(
    ("how", "when", "workers"),
    [
        ("SIGKILL", "first bytes", 1),
        ("SIGKILL", "middle", 1),
        ("SIGKILL", "last MiB", 1),
        ("SIGTERM", "middle", 1),  # with a drain shorter than the download: handed over
        ("SIGSTOP", "middle", 1),  # as a network cut: silent, its lock no longer renewed
        ("SIGKILL", "middle", 2),  # replicas of two worker processes each
    ],
)
async def test_losing_the_downloading_replica_cuts_no_client_of_the_others(
    how: str,
    when: str,
    workers: int,
    redis_server: RedisServer,  # first: it stops after the replicas
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    tmp_path: Path,
) -> None:
    size = 6 * MiB
    image = seed_image(
        registry, "library/handover", "1", platforms=("linux/amd64",), layer_sizes=(size,)
    )
    digest = image.child("linux/amd64").layers[0]
    data = image.blobs[digest]
    upstream = front(registry)
    upstream.add_fault(blob(digest, "GET"), Drip(2 * MiB))  # the first GET: about 3 s
    bucket = seaweed.bucket()
    owner, *others = fleet(
        proxy_factory,
        seaweed,
        bucket,
        upstream,
        redis_server,
        tmp_path,
        *("--drain-timeout", "1s", "--workers", str(workers)),
    )
    path = f"/v2/library/handover/blobs/{digest}"

    first = Stream(owner.url + path)
    tasks = [asyncio.create_task(first.run())]
    await until(lambda: lock_owner(redis_server, digest) == owner.url, 10, "the owner's lock")
    streams = [Stream(p.url + path) for p in others for _ in range(2)]
    tasks += [asyncio.create_task(s.run()) for s in streams]
    threshold = {"first bytes": 1, "middle": len(data) // 2, "last MiB": len(data) - MiB}[when]
    await until(lambda: min(s.received for s in streams) >= threshold, 20, f"{when} streamed")
    assert max(s.received for s in streams) < len(data)  # still under way
    killed_at = time.monotonic()
    # how soon the others go on: a dead owner is found by its refused address, a stopping one
    # releases its lock, a silent one's lock expires (6 s) once its stream was silent (5 s)
    within = 4.0
    if how == "SIGKILL":
        owner.kill9()
    elif how == "SIGTERM":
        tasks.append(asyncio.create_task(asyncio.to_thread(owner.stop)))
        within += 1.0  # it hands over after its drain timeout
    else:
        assert owner.pid is not None
        os.kill(owner.pid, signal.SIGSTOP)
        within += 6.0
    try:
        await asyncio.wait_for(asyncio.gather(*tasks[1:]), 30)
    finally:
        if how == "SIGSTOP":
            owner.kill9()
    await asyncio.wait_for(tasks[0], 10)

    for s in streams:
        assert (s.error, s.status, s.received, s.digest) == (None, 200, len(data), digest), s.url
    assert max(s.done_at or 0 for s in streams) - killed_at < within
    gets = [r for r in upstream.requests if r.method == "GET" and r.path.endswith(digest)]
    assert len(gets) == 2  # the first, and one resume by the replica that took over
    resumed_at = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert threshold <= resumed_at < len(data)
    # the replica that took over made it durable in the bucket
    deadline = time.monotonic() + 10
    while blob_key(digest) not in seaweed.keys(bucket, "cache/"):
        assert time.monotonic() < deadline, "the blob never reached the bucket"
        await asyncio.sleep(0.1)
    stored = seaweed.client().get_object(Bucket=bucket, Key=blob_key(digest))["Body"].read()
    assert stored == data


@dataclass
class Pulls:
    """Pulls through whichever replicas are up, as a Service would route them."""

    replicas: list[ProxyProcess]
    down: set[int] = field(default_factory=set)
    exact: int = 0
    failures: list[str] = field(default_factory=list)
    rerouted: int = 0
    turn: int = 0

    def pick(self, via: int | None) -> ProxyProcess:
        if via is not None and via not in self.down:
            return self.replicas[via]
        up = [r for i, r in enumerate(self.replicas) if i not in self.down]
        self.turn += 1
        return up[self.turn % len(up)]

    async def get(self, path: str, via: int | None) -> tuple[int, bytes]:
        """GET through replica ``via`` (or the next one up); a connection refused before any
        answer (the pod is gone from the Service a moment late) goes to the next one; a body cut
        short is a failure."""
        for _ in range(5):
            replica = self.pick(via)
            try:
                async with (
                    aiohttp.ClientSession(
                        auto_decompress=False, connector=aiohttp.TCPConnector(force_close=True)
                    ) as session,
                    session.get(replica.url + path, headers={"Accept": ACCEPT}) as resp,
                ):
                    return resp.status, await resp.read()
            except aiohttp.ClientConnectorError:
                self.rerouted += 1
                via = None
                await asyncio.sleep(0.05)
        raise AssertionError(f"no replica answered {path}")

    async def pull(self, image: SeededImage, via: int | None = None) -> None:
        try:
            status, body = await self.get(f"/v2/{image.repository}/manifests/{image.tag}", via)
            assert (status, body) == (200, image.raw), f"manifest {status}"
            answers = await asyncio.gather(
                *(self.get(f"/v2/{image.repository}/blobs/{d}", via) for d in image.blobs)
            )
            for (status, body), (digest, data) in zip(answers, image.blobs.items(), strict=True):
                assert status == 200 and body == data, f"{digest}: {status}, {len(body)} bytes"
            self.exact += 1
        except (AssertionError, aiohttp.ClientError) as exc:
            self.failures.append(f"{image.repository}: {exc!r}")


async def test_rolling_restart_under_pulls_every_pull_exact(
    redis_server: RedisServer,  # first: it stops after the replicas
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = [
        seed_image(
            registry,
            f"library/roll{i}",
            "1",
            platforms=("linux/amd64",),
            single=True,
            layer_sizes=(2 * MiB, 300_000),
        )
        for i in range(4)
    ]
    warm, cold = images[0], images[1:]
    upstream = front(registry)
    # The first restart meets a layer that takes about 12 s: longer than the 5 + 5 s aiohttp
    # gives requests under way once the listener is closed, shorter than the drain; the others
    # a layer of about 2 s.
    for image, rate in zip(cold, (170 * 1024, MiB, MiB), strict=True):
        for digest, data in image.blobs.items():
            if len(data) > MiB:
                upstream.add_fault(blob(digest, "GET"), Drip(rate), times=2)
    monkeypatch.setattr(proxyproc, "STOP_TIMEOUT", 20.0)  # SIGKILL after 20 s, not 10 s
    bucket = seaweed.bucket()
    replicas = fleet(
        proxy_factory,
        seaweed,
        bucket,
        upstream,
        redis_server,
        tmp_path,
        "--drain-timeout",
        "15s",
    )
    pulls = Pulls(replicas)
    await pulls.pull(warm)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await pulls.pull(warm)
            await asyncio.sleep(0.1)

    background = asyncio.create_task(loop())
    try:
        for i, replica in enumerate(replicas):
            # A cold image pulled through every replica at once, the one to stop included;
            # one replica downloads its layer, the others follow.
            wave = asyncio.gather(*(pulls.pull(cold[i], via) for via in range(3)))
            await asyncio.sleep(1.0)  # under way
            stopping = asyncio.create_task(asyncio.to_thread(replica.stop))
            await asyncio.sleep(0.3)  # requests still arrive for a moment after SIGTERM
            pulls.down.add(i)
            assert await stopping == 0
            await wave
            await asyncio.to_thread(replica.start)
            pulls.down.discard(i)
    finally:
        stop.set()
        await asyncio.wait_for(background, 30)

    assert pulls.failures == []
    assert pulls.exact >= 3 * 3 + 10
    for image in cold:
        for digest in image.blobs:
            assert upstream.count("GET", f"/blobs/{digest}") <= 2, digest


async def test_a_dead_owners_lock_is_deleted_never_a_newer_owners(
    redis_server: RedisServer,
) -> None:
    digest = "sha256:" + "ab" * 32
    a, b, c = (RedisCoordinator(connect(redis_server.url), name) for name in "abc")
    try:
        assert await a.acquire(digest, "http://a:5000", "docker.io", "library/x") is True
        assert await b.acquire(digest, "http://b:5000", "docker.io", "library/x") is False
        seen = await b.inflight(digest)
        assert seen is not None
        assert (seen.owner, seen.url, seen.repository) == ("a", "http://a:5000", "library/x")
        assert 0 < await b.client.pttl(f"regproxy:lock:blob:{digest}") <= 6000
        # a is found gone: b deletes a's lock, and c takes it
        assert await b.release_dead(digest, seen) is True
        assert await c.acquire(digest, "http://c:5000", "docker.io", "library/x") is True
        # a stale verdict on a, a's late renewal and release: none touches c's lock
        assert await b.release_dead(digest, seen) is False
        assert await a.refresh(digest) is False
        await a.release(digest)
        now = await b.inflight(digest)
        assert now is not None and now.owner == "c"
        assert await c.refresh(digest) is True
        await c.release(digest)
        assert await b.inflight(digest) is None
    finally:
        for coordinator in (a, b, c):
            await coordinator.client.aclose()
