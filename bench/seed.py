"""Generated content, pushed to the upstream with the registry's own upload API.

Nothing is held in memory whole: each blob is a deterministic stream of incompressible chunks
(a per-blob random block, sliced at a different offset for every chunk and stamped with the chunk
number, so no two chunks and no two blobs are alike), generated once to hash it and once more while
it is uploaded (``POST /blobs/uploads/`` then a monolithic ``PUT ?digest=`` with a streamed body).

Image layers are real gzipped tars (deflate level 0 — "stored" blocks — which is what random data
would compress to anyway, at memcpy speed); the config carries their ``diff_ids``, so any client,
dockerd included, can pull the image. The image is a Docker schema 2 manifest, one platform.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CHUNK = 1024 * 1024
_BLOCK = 4 * CHUNK

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
#: What a client that takes any single-platform manifest or index sends.
ACCEPT = ", ".join(
    (
        MANIFEST_V2,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


def random_stream(size: int, seed: bytes) -> Iterator[bytes]:
    """``size`` incompressible bytes in chunks of at most 1 MiB, the same for the same ``seed``."""
    block = hashlib.shake_256(seed).digest(_BLOCK)  # deterministic: regenerated for the upload
    block = block + block[:CHUNK]
    sent, i = 0, 0
    while sent < size:
        n = min(CHUNK, size - sent)
        start = (i * 104_729) % (_BLOCK - 16)  # a prime stride: each chunk starts elsewhere
        chunk = struct.pack(">QQ", i, size) + block[start : start + n - 16]
        yield chunk[:n]
        sent += n
        i += 1


def layer_stream(size: int, seed: bytes) -> tuple[Callable[[], Iterator[bytes]], str]:
    """A gzipped tar of about ``size`` bytes (one file of random data), and its tar's digest.

    Returns a factory of the gzip stream (callable again for the upload) and the ``diff_id``.
    """
    payload = max(0, size - 2048)
    info = tarfile.TarInfo(f"bench/{seed.hex()[:16]}.bin")
    info.size, info.mode, info.mtime = payload, 0o644, 1_700_000_000
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    pad = (-payload) % 512
    trailer = b"\0" * (pad + 1024)

    def tar_chunks() -> Iterator[bytes]:
        yield header
        yield from random_stream(payload, seed)
        yield trailer

    def gz_chunks() -> Iterator[bytes]:
        comp = zlib.compressobj(0, zlib.DEFLATED, 31)  # gzip framing, stored blocks
        for chunk in tar_chunks():
            out = comp.compress(chunk)
            if out:
                yield out
        yield comp.flush()

    diff = hashlib.sha256()
    for chunk in tar_chunks():
        diff.update(chunk)
    return gz_chunks, "sha256:" + diff.hexdigest()


@dataclass
class Blob:
    digest: str
    size: int


@dataclass
class Image:
    repository: str
    tag: str
    digest: str
    manifest: bytes
    config: Blob
    layers: list[Blob] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Every byte a pull moves: manifest, config and layers."""
        return len(self.manifest) + self.config.size + sum(layer.size for layer in self.layers)


class Pusher:
    """Pushes to a distribution registry over plain HTTP (no auth)."""

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.host, self.port = parts.hostname, parts.port
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def push_blob(self, repository: str, make: Callable[[], Iterator[bytes]]) -> Blob:
        """Hash ``make()``'s stream, then upload a second pass of it; return its digest/size."""
        h, size = hashlib.sha256(), 0
        for chunk in make():
            h.update(chunk)
            size += len(chunk)
        digest = "sha256:" + h.hexdigest()
        conn = self._conn()
        try:
            conn.request("HEAD", f"/v2/{repository}/blobs/{digest}")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return Blob(digest, size)
            conn.request(
                "POST", f"/v2/{repository}/blobs/uploads/", headers={"Content-Length": "0"}
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status != 202:
                raise RuntimeError(f"upload start answered {resp.status}")
            location = resp.headers["Location"]
            parts = urlsplit(location)
            target = (
                parts.path + "?" + (parts.query + "&" if parts.query else "") + f"digest={digest}"
            )
            conn.request(
                "PUT",
                target,
                body=make(),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 201:
                raise RuntimeError(f"upload answered {resp.status}: {body[:300]!r}")
        finally:
            conn.close()
        return Blob(digest, size)

    def push_bytes(self, repository: str, data: bytes) -> Blob:
        return self.push_blob(repository, lambda: iter((data,)))

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        conn = self._conn()
        try:
            conn.request(
                "PUT",
                f"/v2/{repository}/manifests/{reference}",
                body=data,
                headers={"Content-Type": media_type},
            )
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 201:
                raise RuntimeError(f"manifest push answered {resp.status}: {body[:300]!r}")
        finally:
            conn.close()
        return "sha256:" + hashlib.sha256(data).hexdigest()


def random_blob(pusher: Pusher, repository: str, size: int, name: str, salt: bytes) -> Blob:
    seed = hashlib.sha256(salt + name.encode()).digest()
    return pusher.push_blob(repository, lambda: random_stream(size, seed))


def push_image(
    pusher: Pusher, repository: str, tag: str, layer_sizes: list[int], salt: bytes
) -> Image:
    """Push a single-platform Docker image with one gzipped-tar layer per size."""
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        seed = hashlib.sha256(salt + f"{repository}:{tag}/layer{i}".encode()).digest()
        make, diff_id = layer_stream(size, seed)
        layers.append(pusher.push_blob(repository, make))
        diff_ids.append(diff_id)
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Labels": {"org.regproxy.bench.salt": salt.hex()}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z"} for _ in layers],
    }
    config_bytes = json.dumps(config_doc, indent=2).encode()
    config = pusher.push_bytes(repository, config_bytes)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {"mediaType": CONFIG_V1, "size": config.size, "digest": config.digest},
        "layers": [
            {"mediaType": LAYER_GZIP, "size": layer.size, "digest": layer.digest}
            for layer in layers
        ],
    }
    manifest = json.dumps(manifest_doc, indent=3).encode()
    digest = pusher.push_manifest(repository, tag, manifest, MANIFEST_V2)
    return Image(repository, tag, digest, manifest, config, layers)


def salt() -> bytes:
    """Fresh per run, so no cache anywhere can already hold this run's content."""
    return os.urandom(16)
