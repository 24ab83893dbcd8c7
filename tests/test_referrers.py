"""The OCI 1.1 referrers API through regproxy, against distribution 2.8 (which has no such API).

The upstream holds an image, two artifact manifests whose ``subject`` is that image (a
signature-like one and an SBOM-like one, each with its ``artifactType`` and a blob), pushed by
HTTP byte for byte, and the fallback tag ``sha256-<hex>``: an index whose manifests are the two
artifacts' descriptors, as cosign/oras write it for registries without the API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.harness.front import Front, Status, path_contains
from tests.harness.images import SeededImage, seed_image
from tests.harness.proxyproc import ProxyProcess
from tests.harness.push import (
    EMPTY_JSON,
    OCI_EMPTY,
    canonical,
    descriptor,
    push_blob,
    push_manifest,
    sha256_digest,
)
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.test_access import basic, write_access_config
from tests.test_read_path import fetch

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIGNATURE = "application/vnd.example.signature.v1+json"
SBOM = "application/vnd.example.sbom.v1+json"

FrontFactory = Callable[..., Front]
ProxyFactory = Callable[..., ProxyProcess]


@dataclass
class Artifact:
    digest: str
    raw: bytes
    artifact_type: str
    blob: bytes

    @property
    def descriptor(self) -> dict[str, object]:
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.digest,
            "size": len(self.raw),
            "artifactType": self.artifact_type,
        }


@dataclass
class Signed:
    image: SeededImage
    artifacts: dict[str, Artifact]
    upstream: Front


def push_artifact(
    registry: Registry, repository: str, subject: SeededImage, artifact_type: str, blob: bytes
) -> Artifact:
    """An OCI artifact manifest naming ``subject``: empty config, one layer, ``artifactType``."""
    push_blob(registry.url, repository, EMPTY_JSON)
    push_blob(registry.url, repository, blob)
    raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor(OCI_EMPTY, EMPTY_JSON),
            "layers": [descriptor("application/octet-stream", blob)],
            "subject": {
                "mediaType": subject.media_type,
                "digest": subject.digest,
                "size": len(subject.raw),
            },
        }
    )
    digest = push_manifest(registry.url, repository, sha256_digest(raw), raw, OCI_MANIFEST)
    return Artifact(digest, raw, artifact_type, blob)


@pytest.fixture
def signed(registry: Registry, front: FrontFactory) -> Signed:
    image = seed_image(registry, "library/signed", "1", platforms=("linux/amd64",), single=True)
    artifacts = {
        "sig": push_artifact(registry, "library/signed", image, SIGNATURE, b"signature bytes"),
        "sbom": push_artifact(registry, "library/signed", image, SBOM, b'{"sbom": true}'),
    }
    fallback = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [a.descriptor for a in artifacts.values()],
        }
    )
    tag = image.digest.replace(":", "-")
    push_manifest(registry.url, "library/signed", tag, fallback, OCI_INDEX)
    return Signed(image, artifacts, front(registry))


async def referrers(
    proxy: ProxyProcess,
    name: str,
    digest: str,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], dict[str, object]]:
    status, resp_headers, body = await fetch(
        f"{proxy.url}/v2/{name}/referrers/{digest}{query}", headers=headers
    )
    return status, dict(resp_headers), json.loads(body)


async def test_referrers_from_the_fallback_tag_with_filtering(
    signed: Signed, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(signed.upstream.url)
    digest = signed.image.digest
    status, headers, index = await referrers(proxy, "library/signed", digest)
    assert status == 200 and headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in headers
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [a.descriptor for a in signed.artifacts.values()]
    # upstream has no referrers API (404), so the fallback tag was read
    assert signed.upstream.count(path_contains=f"/referrers/{digest}") == 1
    assert signed.upstream.count(path_contains=f"/manifests/{digest.replace(':', '-')}") >= 1

    for artifact_type, key in ((SIGNATURE, "sig"), (SBOM, "sbom")):
        status, headers, index = await referrers(
            proxy, "library/signed", digest, f"?artifactType={quote(artifact_type, safe='')}"
        )
        assert status == 200 and headers["OCI-Filters-Applied"] == "artifactType"
        assert index["manifests"] == [signed.artifacts[key].descriptor]
    status, headers, index = await referrers(
        proxy, "library/signed", digest, "?artifactType=application/none"
    )
    assert (status, index["manifests"]) == (200, [])
    # single-component name: Docker Hub's library/ convention, same answer
    assert (await referrers(proxy, "signed", digest))[2]["manifests"] == [
        a.descriptor for a in signed.artifacts.values()
    ]

    # a digest nothing refers to: 200 and an empty index (no fallback tag either)
    status, _, index = await referrers(proxy, "library/signed", sha256_digest(b"nothing"))
    assert (status, index["manifests"]) == (200, [])
    # a malformed digest is refused before upstream
    before = signed.upstream.count()
    status, _, body = await fetch(f"{proxy.url}/v2/library/signed/referrers/sha256:xyz")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
    assert signed.upstream.count() == before


async def test_referrer_manifests_and_blobs_are_served_under_the_subject(
    signed: Signed, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(signed.upstream.url)
    for artifact in signed.artifacts.values():
        status, headers, body = await fetch(
            f"{proxy.url}/v2/library/signed/manifests/{artifact.digest}"
        )
        assert (status, body) == (200, artifact.raw)
        assert headers["Docker-Content-Digest"] == artifact.digest
        assert json.loads(body)["subject"]["digest"] == signed.image.digest
        blob = sha256_digest(artifact.blob)
        status, _, body = await fetch(f"{proxy.url}/v2/library/signed/blobs/{blob}")
        assert (status, body) == (200, artifact.blob)


async def test_referrers_cached_like_a_tag_and_served_stale(
    signed: Signed, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(signed.upstream.url, extra_args=["--tag-ttl", "1s"])
    digest = signed.image.digest
    status, headers, first = await referrers(proxy, "library/signed", digest)
    assert status == 200 and headers["X-Cache"] == "MISS"
    asked = signed.upstream.count()
    status, headers, again = await referrers(proxy, "library/signed", digest)
    assert (status, headers["X-Cache"], again) == (200, "HIT", first)
    assert signed.upstream.count() == asked, "within the TTL upstream is not asked again"

    signed.upstream.add_fault(lambda r: True, Status(503), times=1000)
    await asyncio.sleep(1.2)
    status, headers, stale = await referrers(proxy, "library/signed", digest)
    assert (status, headers["X-Cache"], stale) == (200, "STALE", first)
    # filtering works on the stale answer too
    status, headers, sigs = await referrers(
        proxy, "library/signed", digest, f"?artifactType={quote(SIGNATURE, safe='')}"
    )
    assert status == 200 and headers["OCI-Filters-Applied"] == "artifactType"
    assert sigs["manifests"] == [signed.artifacts["sig"].descriptor]
    # never seen and upstream down: an error, not an empty (wrong) answer
    status, _, body = await fetch(
        f"{proxy.url}/v2/library/signed/referrers/{sha256_digest(b'unknown')}"
    )
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_upstream_referrers_api_is_passed_through_and_filtered(
    signed: Signed, proxy_factory: ProxyFactory
) -> None:
    """An upstream with the API (distribution 2.8 has none: its answer is injected by the
    Front) is passed through byte for byte, and filtered here since upstream was asked for all."""
    digest = signed.image.digest
    answer = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [a.descriptor for a in signed.artifacts.values()],
            "annotations": {"from": "upstream api"},
        },
        indent=1,
    ).encode()
    signed.upstream.add_fault(
        path_contains(f"/referrers/{digest}"),
        Status(200, {"Content-Type": OCI_INDEX}, answer),
        times=10,
    )
    proxy = proxy_factory(signed.upstream.url)
    status, headers, body = await fetch(f"{proxy.url}/v2/library/signed/referrers/{digest}")
    assert (status, body) == (200, answer)
    referrer_requests = [r for r in signed.upstream.requests if "/referrers/" in r.path]
    assert len(referrer_requests) == 1 and "artifactType" not in referrer_requests[0].query
    assert signed.upstream.count(path_contains=digest.replace(":", "-")) == 0  # no fallback
    status, headers, index = await referrers(
        proxy, "library/signed", digest, f"?artifactType={quote(SBOM, safe='')}"
    )
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert index["manifests"] == [signed.artifacts["sbom"].descriptor]
    assert len([r for r in signed.upstream.requests if "/referrers/" in r.path]) == 1


async def test_referrers_follow_the_access_rules(
    registry: Registry,
    signed: Signed,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    """Under ``auth``, the referrers of a repository are as private as its content."""
    corp = front(registry)  # the same registry as the private upstream "corp"
    config = write_access_config(tmp_path, signed.upstream.url, registry.url, corp.url)
    proxy = proxy_factory(signed.upstream.url, extra_args=["--config", str(config)])
    digest = signed.image.digest
    # anonymous may pull docker.io/library/*, bob docker.io/*, neither corp/*
    for name, creds, expect in (
        ("corp/library/signed", None, 401),
        ("corp/library/signed", ("bob", "bob-pw"), 403),
    ):
        status, _, body = await fetch(
            f"{proxy.url}/v2/{name}/referrers/{digest}",
            headers=basic(*creds) if creds else None,
        )
        assert status == expect
        assert signed.artifacts["sig"].digest.encode() not in body
    assert corp.count() == 0, "a refused request reached the private upstream"
    status, _, index = await referrers(
        proxy, "corp/library/signed", digest, headers=basic("alice", "alice-pw")
    )
    assert status == 200 and len(index["manifests"]) == 2
    assert corp.count() > 0
    status, _, index = await referrers(proxy, "library/signed", digest)
    assert status == 200 and len(index["manifests"]) == 2


async def test_fallback_descriptors_without_artifact_type_are_completed(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    """Older tools wrote the fallback index without ``artifactType``: regproxy reads it from
    each referrer manifest (and its annotations), so filtering still works."""
    image = seed_image(registry, "library/old", "1", platforms=("linux/amd64",), single=True)
    artifact = push_artifact(registry, "library/old", image, SIGNATURE, b"old signature")
    bare = {"mediaType": OCI_MANIFEST, "digest": artifact.digest, "size": len(artifact.raw)}
    fallback = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [bare]})
    push_manifest(registry.url, "library/old", image.digest.replace(":", "-"), fallback, OCI_INDEX)
    proxy = proxy_factory(front(registry).url)
    status, _, index = await referrers(proxy, "library/old", image.digest)
    assert (status, index["manifests"]) == (200, [artifact.descriptor])
    status, headers, index = await referrers(
        proxy, "library/old", image.digest, f"?artifactType={quote(SIGNATURE, safe='')}"
    )
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert index["manifests"] == [artifact.descriptor]


async def test_replicas_share_referrers_answers_through_redis(
    signed: Signed, proxy_factory: ProxyFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A referrers answer fetched by one replica is served by another without asking upstream
    (the record lives in Redis and in the store they share: replicas on one Redis must share
    their store, ``storage.identity``)."""
    args = ["--redis", redis_server.url]
    a = proxy_factory(signed.upstream.url, storage=tmp_path / "shared", extra_args=args)
    b = proxy_factory(signed.upstream.url, storage=tmp_path / "shared", extra_args=args)
    digest = signed.image.digest
    status, _, first = await referrers(a, "library/signed", digest)
    assert status == 200 and len(first["manifests"]) == 2
    signed.upstream.reset()
    status, headers, second = await referrers(b, "library/signed", digest)
    assert (status, headers["X-Cache"], second) == (200, "HIT", first)
    assert signed.upstream.count() == 0
