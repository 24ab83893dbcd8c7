"""A bounded soak (issue #6): hundreds of clients against a misbehaving upstream.

``REGPROXY_SOAK_SECONDS`` (default 60) and ``REGPROXY_SOAK_CLIENTS`` (default 200) size it. The
clients pull a mix of cached and not-yet-cached blobs (new blobs become eligible as the run goes
on, so there are cold ones until the end), manifests by tag and digest, ranges and HEADs, and some
leave mid-transfer, while the ``Front`` injects a random fault every 100 ms (cuts, flipped bytes,
wrong lengths, 5xx, slow bodies, the odd 429).

Afterwards: no client ever got wrong bytes (every 200 body hashes to its digest, every cut body is
a correct prefix), every error was a registry error, every stored blob verifies, no temp file is
left, the proxy's RSS is flat-ish after warm-up and its open file descriptors are back near where
they started.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from yarl import URL

from tests.harness.front import (
    CutAfter,
    Drip,
    FlipByte,
    Front,
    Status,
    WrongLength,
    any_request,
    path_contains,
    too_many_requests,
)
from tests.harness.images import MANIFEST_TYPES, SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry
from tests.test_faults import eventually, stored_blobs_verify, temp_files

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]

SOAK_SECONDS = float(os.environ.get("REGPROXY_SOAK_SECONDS", "60"))
SOAK_CLIENTS = int(os.environ.get("REGPROXY_SOAK_CLIENTS", "200"))
EXTRA_BLOBS = 200
#: A request with no answer in this time counts as hung.
REQUEST_TIMEOUT = 20
ACCEPT = ", ".join(MANIFEST_TYPES)
MiB = 1024 * 1024


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def push_blobs(
    registry: Registry, repository: str, count: int, seed: int
) -> dict[str, bytes]:
    """Upload *count* random blobs (4 KiB - 512 KiB) straight to the registry (no manifest)."""
    rnd = random.Random(seed)
    blobs = {}
    for _ in range(count):
        data = rnd.randbytes(
            rnd.choice([4096, 32 * 1024, 128 * 1024, 512 * 1024]) - rnd.randrange(1000)
        )
        blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def upload(digest: str, data: bytes) -> None:
            async with sem:
                async with session.post(f"{registry.url}/v2/{repository}/blobs/uploads/") as resp:
                    assert resp.status == 202, await resp.text()
                    location = URL(resp.headers["Location"])
                if not location.is_absolute():
                    location = URL(registry.url).join(location)
                async with session.put(
                    location.update_query(digest=digest),
                    data=data,
                    headers={"Content-Type": "application/octet-stream"},
                ) as resp:
                    assert resp.status == 201, await resp.text()

        await asyncio.gather(*(upload(d, b) for d, b in blobs.items()))
    return blobs


@dataclass
class Tally:
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    wrong: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)

    def bad(self, what: str) -> None:
        if len(self.wrong) < 50:
            self.wrong.append(what)
        self.counts["WRONG"] += 1


FAULTS: list[tuple[float, Callable[[random.Random], object]]] = [
    (3, lambda r: CutAfter(r.randrange(0, 300_000))),
    (2, lambda r: FlipByte(r.randrange(0, 4000))),
    (1, lambda r: WrongLength(r.choice([-7, -1, 1, 9]))),
    (2, lambda r: Status(503)),
    (1, lambda r: Status(502)),
    (1, lambda r: Status(500)),
    (2, lambda r: Drip(r.choice([256 * 1024, 1 * MiB]))),
    (0.15, lambda r: too_many_requests(1)),
]
MATCHES = [path_contains("/blobs/", "GET"), path_contains("/manifests/"), any_request]


async def misbehave(
    upstream: Front, deadline: float, rnd: random.Random
) -> collections.Counter[str]:
    applied: collections.Counter[str] = collections.Counter()
    weights = [w for w, _ in FAULTS]
    while time.monotonic() < deadline:
        _, make = rnd.choices(FAULTS, weights)[0]
        fault = make(rnd)
        upstream.add_fault(rnd.choice(MATCHES), fault)  # type: ignore[arg-type]
        applied[type(fault).__name__] += 1
        await asyncio.sleep(0.1)
    return applied


@pytest.mark.timeout(int(SOAK_SECONDS) + 240)
async def test_soak_under_a_misbehaving_upstream(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    record_property: Callable[[str, object], None],
) -> None:
    images: list[SeededImage] = [
        seed_image(
            registry,
            "library/soak",
            "1",
            platforms=("linux/amd64", "linux/arm64/v8", "linux/arm/v7"),
            layer_sizes=(256 * 1024, 64 * 1024),
        ),
        seed_image(registry, "library/soakd", "2", fmt="docker", layer_sizes=(96 * 1024,)),
    ]
    seed = int(os.environ.get("REGPROXY_SOAK_SEED", str(random.randrange(1 << 30))))
    record_property("soak_seed", seed)
    extra = await push_blobs(registry, "library/soak", EXTRA_BLOBS, seed)
    blobs: dict[str, tuple[str, bytes]] = {d: ("library/soak", b) for d, b in extra.items()}
    manifests: list[tuple[str, str, bytes]] = []  # (repository, reference, bytes)
    for image in images:
        for digest, data in image.blobs.items():
            blobs[digest] = (image.repository, data)
        manifests.append((image.repository, image.tag, image.raw))
        for digest, raw in image.manifests.items():
            manifests.append((image.repository, digest, raw))
    order = list(blobs)
    random.Random(seed).shuffle(order)

    upstream = front(registry)
    proxy = proxy_factory(upstream.url, extra_args=["--tag-ttl", "1s", "--log-level", "warning"])
    assert proxy.pid is not None
    pid = proxy.pid
    fds_before = fd_count(pid)

    started = time.monotonic()
    deadline = started + SOAK_SECONDS
    tally = Tally()
    rss_samples: list[tuple[float, int]] = []

    def available() -> list[str]:
        share = min(1.0, 0.2 + 0.8 * (time.monotonic() - started) / SOAK_SECONDS)
        return order[: max(1, int(len(order) * share))]

    async def check_body(resp: aiohttp.ClientResponse, want: bytes, start: int = 0) -> int:
        """Read the body; a complete one must equal ``want[start:]``. Returns its length.

        A body that breaks off (``ClientPayloadError``) may hold wrong bytes: the proxy streams
        a cold blob before it can verify it and only guarantees the client never gets a
        *complete* wrong blob (the last byte is held back, the connection cut).
        """
        hasher = hashlib.sha256()
        got = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            hasher.update(chunk)
            got += len(chunk)
        if hasher.digest() != hashlib.sha256(want[start:]).digest():
            tally.bad(
                f"complete but wrong body from {resp.url}: status {resp.status}, "
                f"cache {resp.headers.get('X-Cache')}, length {resp.headers.get('Content-Length')}"
                f" (want {len(want) - start}, got {got}), range "
                f"{resp.request_info.headers.get('Range')}"
            )
        return got

    async def one(session: aiohttp.ClientSession, rnd: random.Random, state: list[str]) -> None:
        op = rnd.choices(
            ["blob", "range", "head", "tag", "digest", "vanish"], [55, 10, 5, 15, 10, 5]
        )[0]
        state[:] = [op]
        if op in ("tag", "digest"):
            pool = [m for m in manifests if (op == "tag") == (":" not in m[1])]
            repository, reference, raw = rnd.choice(pool)
            url = f"{proxy.url}/v2/{repository}/manifests/{reference}"
            async with session.get(url, headers={"Accept": ACCEPT}) as resp:
                body = await resp.read()
                if resp.status == 200:
                    if (
                        body != raw
                        or resp.headers.get("Docker-Content-Digest")
                        != "sha256:" + hashlib.sha256(raw).hexdigest()
                    ):
                        tally.bad(f"wrong manifest {url}")
                    tally.counts[f"{op}-200-{resp.headers.get('X-Cache')}"] += 1
                else:
                    check_error(resp.status, resp.headers, body, url)
            return
        digest = rnd.choice(available())
        repository, data = blobs[digest]
        url = f"{proxy.url}/v2/{repository}/blobs/{digest}"
        state.append(url)
        if op == "head":
            async with session.head(url) as resp:
                if resp.status == 200:
                    if resp.headers.get("Content-Length") not in (None, str(len(data))):
                        tally.bad(f"HEAD length {resp.headers.get('Content-Length')} for {url}")
                    tally.counts["head-200"] += 1
                else:
                    check_error(resp.status, resp.headers, b"", url)
            return
        headers = {}
        first, last = 0, len(data) - 1
        if op == "range":
            first = rnd.randrange(len(data))
            last = rnd.randrange(first, len(data))
            headers["Range"] = f"bytes={first}-{last}"
        async with session.get(url, headers=headers) as resp:
            state.append(f"status {resp.status} {resp.headers.get('X-Cache')}")
            if op == "vanish":
                await resp.content.read(rnd.randrange(1, 64 * 1024))
                resp.close()
                tally.counts["vanished"] += 1
                return
            if resp.status in (200, 206):
                expect_start = first if resp.status == 206 else 0
                want = data if resp.status == 200 else data[: last + 1]
                try:
                    await check_body(resp, want, expect_start)
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                    tally.counts["cut"] += 1
                    return
                if resp.status == 200 and resp.headers.get("Docker-Content-Digest") != digest:
                    tally.bad(f"digest header for {url}")
                tally.counts[f"{op}-{resp.status}-{resp.headers.get('X-Cache')}"] += 1
            else:
                check_error(resp.status, resp.headers, await resp.read(), url)

    def check_error(status: int, headers: object, body: bytes, url: str) -> None:
        if status not in (429, 503):
            tally.bad(f"status {status} for {url}: {body[:200]!r}")
            return
        if body:
            try:
                code = json.loads(body)["errors"][0]["code"]
            except (ValueError, KeyError, IndexError):
                tally.bad(f"not a registry error: {body[:200]!r}")
                return
            if code not in ("TOOMANYREQUESTS", "UNAVAILABLE"):
                tally.bad(f"code {code} for {url}")
        tally.counts[f"error-{status}"] += 1

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        rnd = random.Random(seed + i)
        state: list[str] = []
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(one(session, rnd, state), REQUEST_TIMEOUT)
            except (
                aiohttp.ClientPayloadError,
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError,
            ):
                tally.counts["cut"] += 1
            except TimeoutError:
                tally.counts["HUNG"] += 1
                if len(tally.hung) < 20:
                    tally.hung.append(" ".join(state))

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss_samples.append((time.monotonic() - started, rss_kib(pid)))
            await asyncio.sleep(2)

    connector = aiohttp.TCPConnector(limit=SOAK_CLIENTS + 10)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        results = await asyncio.gather(
            misbehave(upstream, deadline, random.Random(seed)),
            sample(),
            *(worker(i, session) for i in range(SOAK_CLIENTS)),
        )
    applied: collections.Counter[str] = results[0]  # type: ignore[assignment]
    upstream.clear_faults()

    # settle: downloads finish, connections close
    assert await eventually(lambda: not temp_files(proxy), within=30), temp_files(proxy)
    await asyncio.sleep(2)
    rss_end = rss_kib(pid)
    warm = [kib for t, kib in rss_samples if t >= SOAK_SECONDS * 0.25] or [rss_samples[-1][1]]
    rss_warm = warm[0]
    settled = await eventually(lambda: fd_count(pid) <= fds_before + 48, within=20)
    fds_after = fd_count(pid)

    requests_done = sum(v for k, v in tally.counts.items() if k not in ("WRONG", "HUNG"))
    summary: dict[str, object] = {
        "seconds": SOAK_SECONDS,
        "clients": SOAK_CLIENTS,
        "requests": requests_done,
        "outcomes": dict(sorted(tally.counts.items())),
        "faults": dict(applied),
        "rss_kib": {"warm": rss_warm, "end": rss_end, "max": max(k for _, k in rss_samples)},
        "fds": {"before": fds_before, "after": fds_after},
        "upstream_requests": upstream.count(),
    }
    record_property("soak", json.dumps(summary))
    print("soak summary:", json.dumps(summary, indent=1))

    assert proxy.running, "the proxy died"
    assert not tally.wrong, tally.wrong
    assert requests_done > SOAK_CLIENTS * 5, summary
    assert sum(v for k, v in tally.counts.items() if k.startswith("blob-200-MISS")) > 0
    assert sum(v for k, v in tally.counts.items() if k.startswith("blob-200-HIT")) > 0
    stored = stored_blobs_verify(proxy.storage)
    for digest, size in stored.items():
        assert size == len(blobs[digest][1])
    assert len(stored) > len(blobs) // 2, (len(stored), len(blobs))
    assert rss_end <= rss_warm * 1.5 + 64 * 1024, summary["rss_kib"]

    # a request that never got an answer (a wedged download) is a failure in itself
    assert not tally.hung, f"{tally.counts['HUNG']} requests hung, e.g. {tally.hung[:3]}"
    assert settled, summary["fds"]

    # and it still serves everything right
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for digest in order[:20]:
            repository, data = blobs[digest]
            async with session.get(
                f"{proxy.url}/v2/{repository}/blobs/{digest}",
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as resp:
                assert resp.status == 200
                assert hashlib.sha256(await resp.read()).hexdigest() == digest[7:]
