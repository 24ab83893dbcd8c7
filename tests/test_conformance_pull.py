"""The pull checks of the OCI distribution-spec conformance suite (v1.1.1), through regproxy.

The suite's ``conformance/01_pull_test.go`` run against a pull-only registry (``OCI_TEST_PULL=1``
with ``OCI_TAG_NAME``, ``OCI_MANIFEST_DIGEST`` and ``OCI_BLOB_DIGEST`` set, so its push set-up is
skipped) makes 14 checks. Each has a test here, against a real upstream (distribution 2.8)
holding what the suite's set-up would have pushed: two config blobs, a layer, ``manifests[0]``
tagged ``tagtest0`` and ``manifests[1]`` by digest. Requests carry the headers the suite sends
(``Accept: application/vnd.oci.image.manifest.v1+json`` on the manifest checks, nothing else).

Which answers are acceptable is the suite's: 404 for a missing blob or manifest (including the
reference ``.INVALID_MANIFEST_NAME``, which is no valid tag), 200 (and the right
``Docker-Content-Digest`` when present) for existing ones, and for ``GET
/manifests/sha256:totallywrong`` 400 with a spec error code, or 404.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest
from yarl import URL

from tests.harness.front import Front
from tests.harness.proxyproc import ProxyProcess
from tests.harness.push import canonical, descriptor, push_blob, push_manifest, sha256_digest
from tests.harness.registry import start_registry

NAME = "conformance/pull"
TAG = "tagtest0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: The suite's ``dummyDigest`` (a blob nobody pushed) and ``nonexistentManifest``.
DUMMY_DIGEST = sha256_digest(b"hello world")
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
#: The suite's ``errorCodes``: a 400 must carry one of these.
SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
}


@dataclass
class Suite:
    proxy: ProxyProcess
    upstream: Front
    configs: list[bytes]
    layer: bytes
    manifests: list[bytes]

    @property
    def manifest_digests(self) -> list[str]:
        return [sha256_digest(m) for m in self.manifests]

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.configs[0])


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    base = tmp_path_factory.mktemp("conformance")
    registry = start_registry(base / "registry")
    front: Front | None = None
    proxy: ProxyProcess | None = None
    try:
        configs = [
            canonical(
                {"architecture": arch, "os": "linux", "rootfs": {"diff_ids": [], "type": "layers"}}
            )
            for arch in ("amd64", "arm64")
        ]
        layer = b"\x1f\x8b" + b"conformance layer bytes" * 40
        for blob in (*configs, layer):
            push_blob(registry.url, NAME, blob)
        manifests = [
            canonical(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": descriptor(OCI_CONFIG, config),
                    "layers": [descriptor(OCI_LAYER, layer)],
                }
            )
            for config in configs
        ]
        push_manifest(registry.url, NAME, TAG, manifests[0], OCI_MANIFEST)
        push_manifest(registry.url, NAME, sha256_digest(manifests[1]), manifests[1], OCI_MANIFEST)
        front = Front(registry)
        front.start()
        proxy = ProxyProcess(front.url, base / "storage")
        proxy.start()
        yield Suite(proxy, front, configs, layer, manifests)
    finally:
        if proxy is not None:
            proxy.stop()
        if front is not None:
            front.stop()
        registry.stop()


async def call(
    suite: Suite, method: str, kind: str, reference: str, *, manifest_accept: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One request as the suite's reggie client sends it."""
    headers = {"Accept": OCI_MANIFEST} if manifest_accept else {}
    url = URL(f"{suite.proxy.url}/v2/{NAME}/{kind}/{reference}", encoded=True)
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept"]) as session,
        session.request(method, url, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def digest_header_is(headers: dict[str, str], digest: str) -> None:
    """The suite checks ``Docker-Content-Digest`` only when present; we require it."""
    assert headers.get("Docker-Content-Digest") == digest, headers


# -- Setup ---------------------------------------------------------------------------------------


async def test_setup_get_tag_name(suite: Suite) -> None:
    """ "Get tag name from environment": the tag the suite is given is one regproxy lists."""
    url = URL(f"{suite.proxy.url}/v2/{NAME}/tags/list", encoded=True)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert TAG in json.loads(await resp.read())["tags"]


# -- Pull blobs ----------------------------------------------------------------------------------


async def test_head_nonexistent_blob_is_404(suite: Suite) -> None:
    status, headers, _ = await call(suite, "HEAD", "blobs", DUMMY_DIGEST)
    assert status == 404
    assert "Docker-Content-Digest" not in headers


async def test_head_existing_blob_is_200(suite: Suite) -> None:
    status, headers, body = await call(suite, "HEAD", "blobs", suite.config_digest)
    assert (status, body) == (200, b"")
    digest_header_is(headers, suite.config_digest)
    assert headers["Content-Length"] == str(len(suite.configs[0]))


async def test_get_nonexistent_blob_is_404(suite: Suite) -> None:
    status, _, body = await call(suite, "GET", "blobs", DUMMY_DIGEST)
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_get_existing_blob_is_200(suite: Suite) -> None:
    status, headers, body = await call(suite, "GET", "blobs", suite.config_digest)
    assert (status, body) == (200, suite.configs[0])
    digest_header_is(headers, suite.config_digest)


# -- Pull manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_nonexistent_manifest_is_404_without_asking_upstream(
    suite: Suite, method: str
) -> None:
    before = suite.upstream.count()
    status, headers, body = await call(suite, method, "manifests", NONEXISTENT_MANIFEST)
    assert status == 404
    assert "Docker-Content-Digest" not in headers
    if method == "GET":
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert suite.upstream.count() == before, "an invalid reference was asked of upstream"


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_manifest_by_digest_is_200(suite: Suite, method: str, index: int) -> None:
    digest = suite.manifest_digests[index]
    status, headers, body = await call(suite, method, "manifests", digest, manifest_accept=True)
    assert status == 200
    digest_header_is(headers, digest)
    assert body == (b"" if method == "HEAD" else suite.manifests[index])


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_manifest_by_tag_is_200(suite: Suite, method: str) -> None:
    status, headers, body = await call(suite, method, "manifests", TAG, manifest_accept=True)
    assert status == 200
    digest_header_is(headers, suite.manifest_digests[0])
    assert headers["Content-Type"] == OCI_MANIFEST
    assert body == (b"" if method == "HEAD" else suite.manifests[0])


# -- Error codes ---------------------------------------------------------------------------------


async def test_400_body_is_oci_conforming_json(suite: Suite) -> None:
    before = suite.upstream.count()
    status, _, body = await call(suite, "GET", "manifests", "sha256:totallywrong")
    assert status in (400, 404)
    if status == 400:
        errors = json.loads(body)["errors"]
        assert errors and errors[0]["code"] in SPEC_CODES
    assert suite.upstream.count() == before
