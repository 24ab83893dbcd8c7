"""The object store misbehaving under a cold pull: 500s, a store that dies mid-part, a slow store.

Between the proxy and SeaweedFS (for the presigned read, Ceph's RADOS Gateway too) sits
``S3Front`` (``tests/harness/s3front.py``). Whatever the store does, the client gets exactly the
blob's bytes (or a cut connection, never wrong bytes), no object ever appears under a digest it
does not hash to, and no multipart upload is left behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from storage.s3 import DOWN_FOR
from tests.harness.front import Fault, Front, Req, Stall, all_of, path_contains
from tests.harness.images import seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry
from tests.harness.s3front import (
    CutAfter,
    DropAfterBody,
    S3Front,
    complete_upload,
    get_object,
    put_object,
    s3_error,
    upload_part,
)
from tests.harness.s3store import S3Store
from tests.harness.seaweed import SeaweedS3
from tests.harness.tlsca import LocalCA
from tests.test_read_path import fetch
from tests.test_s3 import MiB, blob_key, s3_proxy, stored

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]


async def in_flight(proxy: ProxyProcess) -> bool:
    metrics = (await fetch(f"{proxy.url}/metrics"))[2].decode()
    return "regproxy_inflight_downloads 0.0" not in metrics


@pytest.mark.parametrize(
    ("size", "match", "fault"),
    [
        (20 * MiB, upload_part, s3_error(500)),  # every part refused
        (20 * MiB, upload_part, DropAfterBody(1024 * 1024)),  # the store dies mid-part
        (20 * MiB, complete_upload, s3_error(503, "SlowDown")),  # cannot complete
        (300_000, put_object, s3_error(500)),  # a small blob's single PUT refused
    ],
    ids=["part-500", "part-dropped", "complete-503", "put-500"],
)
async def test_store_failing_an_upload_never_fails_the_pull(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    s3_front: Callable[[], S3Front],
    tmp_path: Path,
    size: int,
    match: Callable[..., bool],
    fault: Fault,
) -> None:
    image = seed_image(
        registry, "library/flaky", "1", platforms=("linux/amd64",), layer_sizes=(size,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    store = s3_front()
    bucket = seaweed.bucket()
    proxy = s3_proxy(
        proxy_factory,
        seaweed,
        bucket,
        upstream.url,
        tmp_path / "w",
        env={"AWS_ENDPOINT_URL": store.url},
    )
    store.add_fault(match, fault, times=100)
    url = f"{proxy.url}/v2/library/flaky/blobs/{digest}"
    status, _, body = await fetch(url)
    assert status == 200 and body == image.blobs[digest]
    # the client may have its verified bytes before the store is asked to complete (and retries
    # take a while): wait for the download to give up, its upload aborted, the error counted
    deadline = time.monotonic() + 20
    errors: list[str] = []
    while time.monotonic() < deadline:
        metrics = (await fetch(f"{proxy.url}/metrics"))[2].decode()
        errors = [
            line
            for line in metrics.splitlines()
            if line.startswith("regproxy_storage_requests_total{") and 'status="error"' in line
        ]
        if errors and not seaweed.uploads(bucket) and not await in_flight(proxy):
            break
        await asyncio.sleep(0.2)
    assert errors
    assert store.count(match=match) > 0
    assert seaweed.uploads(bucket) == []  # aborted, not left to cost storage
    assert blob_key(digest) not in seaweed.keys(bucket, "cache/")
    # once the store behaves, the blob is fetched and stored like any miss
    store.clear_faults()
    await asyncio.sleep(DOWN_FOR + 0.5)  # after a failure, requests fail fast this long
    before = upstream.count("GET", f"/blobs/{digest}")
    status, _, body = await fetch(url)
    assert status == 200 and body == image.blobs[digest]
    assert upstream.count("GET", f"/blobs/{digest}") == before + 1
    await stored(seaweed, bucket, digest)
    got = seaweed.client().get_object(Bucket=bucket, Key=blob_key(digest))["Body"].read()
    assert got == image.blobs[digest]


async def test_slow_store_still_streams_the_cold_blob(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    s3_front: Callable[[], S3Front],
    tmp_path: Path,
) -> None:
    image = seed_image(
        registry, "library/slowstore", "1", platforms=("linux/amd64",), layer_sizes=(18 * MiB,)
    )
    digest = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    store = s3_front()
    bucket = seaweed.bucket()
    proxy = s3_proxy(
        proxy_factory,
        seaweed,
        bucket,
        upstream.url,
        tmp_path / "w",
        env={"AWS_ENDPOINT_URL": store.url},
    )
    store.add_fault(upload_part, Stall(1.5), times=100)
    status, _, body = await fetch(f"{proxy.url}/v2/library/slowstore/blobs/{digest}")
    assert status == 200 and body == image.blobs[digest]
    await stored(seaweed, bucket, digest)
    assert store.count() >= 3  # create, parts, complete all went through the slow store
    assert upstream.count("GET", f"/blobs/{digest}") == 1


def presigned(req: Req) -> bool:
    """A GET of a presigned URL: the signature rides in the query, no Authorization header."""
    return "X-Amz-Signature=" in req.query and "Authorization" not in req.headers


async def bucket_only(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: S3Store,
    tmp_path: Path,
    name: str,
    sizes: tuple[int, ...],
) -> tuple[Front, str, dict[str, bytes]]:
    """Blobs pulled into a bucket by one replica: (upstream front, bucket, blobs by digest)."""
    image = seed_image(registry, name, "1", platforms=("linux/amd64",), layer_sizes=sizes)
    layers = image.child("linux/amd64").layers
    upstream = front(registry)
    bucket = seaweed.bucket()
    first = s3_proxy(proxy_factory, seaweed, bucket, upstream.url, tmp_path / "w1")
    for digest in layers:
        status, _, body = await fetch(f"{first.url}/v2/{name}/blobs/{digest}")
        assert status == 200 and body == image.blobs[digest]
    await stored(seaweed, bucket, *layers)
    first.stop()
    upstream.reset()
    return upstream, bucket, {d: image.blobs[d] for d in layers}


def replica_through(
    store: S3Front,
    proxy_factory: ProxyFactory,
    seaweed: S3Store,
    bucket: str,
    upstream: Front,
    work: Path,
    **env: str,
) -> ProxyProcess:
    """A new replica (an empty work dir) that reaches the object store through ``store``."""
    return s3_proxy(
        proxy_factory,
        seaweed,
        bucket,
        upstream.url,
        work,
        env={"AWS_ENDPOINT_URL": store.url, **env},
    )


def blob_reads(store: S3Front, digests: Iterable[str]) -> list[Req]:
    """The store's GetObject requests for these blobs, in order."""
    keys = {blob_key(d) for d in digests}
    return [r for r in store.requests if get_object(r) and any(k in r.path for k in keys)]


async def fetch_each(proxy: ProxyProcess, repository: str, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        status, _, body = await fetch(f"{proxy.url}/v2/{repository}/blobs/{digest}")
        assert status == 200 and body == data


async def test_blob_in_the_bucket_only_comes_from_a_presigned_url_and_resumes(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    object_store: S3Store,
    s3_front: Callable[..., S3Front],
    tmp_path: Path,
) -> None:
    upstream, bucket, blobs = await bucket_only(
        registry, front, proxy_factory, object_store, tmp_path, "library/bucketonly", (12 * MiB,)
    )
    [(digest, data)] = blobs.items()
    store = s3_front(store=object_store)
    # a new replica (empty work dir); the store cuts its first read after 3 MiB
    store.add_fault(all_of(get_object, path_contains(blob_key(digest))), CutAfter(3 * MiB))
    proxy = replica_through(store, proxy_factory, object_store, bucket, upstream, tmp_path / "w2")
    await fetch_each(proxy, "library/bucketonly", blobs)
    reads = blob_reads(store, blobs)
    # read on a worker thread from a presigned URL, then the rest through the S3 API from the
    # exact byte the cut left off
    assert [presigned(r) for r in reads] == [True, False]
    assert "Range" not in reads[0].headers
    assert reads[1].headers["Range"] == f"bytes={3 * MiB}-"
    assert upstream.count() == 0
    # verified into the local tier: the next read asks neither the store nor upstream
    store.reset()
    status, headers, body = await fetch(f"{proxy.url}/v2/library/bucketonly/blobs/{digest}")
    assert status == 200 and body == data and headers["X-Cache"] == "HIT"
    assert store.count(match=get_object) == 0 and upstream.count() == 0
    metrics = (await fetch(f"{proxy.url}/metrics"))[2].decode()
    assert 'regproxy_storage_requests_total{op="read",status="ok"} 2.0' in metrics


async def test_refused_presigned_read_falls_back_to_the_s3_api_for_a_while(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    s3_front: Callable[[], S3Front],
    tmp_path: Path,
) -> None:
    upstream, bucket, blobs = await bucket_only(
        registry,
        front,
        proxy_factory,
        seaweed,
        tmp_path,
        "library/nopresign",
        (3 * MiB, 2 * MiB),
    )
    store = s3_front()
    # a store (or a proxy before it) that refuses presigned requests
    store.add_fault(all_of(get_object, presigned), s3_error(403), times=100)
    proxy = replica_through(store, proxy_factory, seaweed, bucket, upstream, tmp_path / "w2")
    await fetch_each(proxy, "library/nopresign", blobs)
    reads = blob_reads(store, blobs)
    # the first blob: refused, then the S3 API; the second: the S3 API at once
    assert [presigned(r) for r in reads] == [True, False, False]
    assert [r.status for r in reads] == [403, 200, 200]
    assert upstream.count() == 0


async def test_untrusted_store_certificate_reads_through_the_s3_api(
    registry: Registry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    seaweed: SeaweedS3,
    s3_front: Callable[..., S3Front],
    local_ca: LocalCA,
    tmp_path: Path,
) -> None:
    """An HTTPS store whose CA botocore is given (AWS_CA_BUNDLE) but the rest of the process is
    not (SSL_CERT_FILE): the presigned read fails its handshake once, every blob still comes
    through the S3 API, and the operator is told why."""
    upstream, bucket, blobs = await bucket_only(
        registry, front, proxy_factory, seaweed, tmp_path, "library/privateca", (3 * MiB, MiB)
    )
    store = s3_front(local_ca.server_context())
    assert store.url.startswith("https://")
    no_authorities = tmp_path / "empty-ca.pem"
    no_authorities.write_text("")
    proxy = replica_through(
        store,
        proxy_factory,
        seaweed,
        bucket,
        upstream,
        tmp_path / "w2",
        AWS_CA_BUNDLE=str(local_ca.ca_file),
        SSL_CERT_FILE=str(no_authorities),
    )
    await fetch_each(proxy, "library/privateca", blobs)
    reads = blob_reads(store, blobs)
    assert len(reads) == 2 and not any(presigned(r) for r in reads)
    assert proxy.logs().count("certificate is not trusted") == 1
    assert upstream.count() == 0
