"""Build real multi-platform images in Python and push them to a registry with skopeo.

Each platform gets 1-3 real gzipped tar layers (``/etc/regproxy-test`` holding the platform and a
random nonce, plus an incompressible filler file to reach the requested size), a config whose
``rootfs.diff_ids`` are the sha256 of the *uncompressed* tars (dockerd verifies them on pull), and
a manifest; an index (OCI) or manifest list (Docker) ties the platforms together. Every image is
unique (random nonce), so two seeded images never share a layer unless a test copies one.

Pushing: ``skopeo copy --all --preserve-digests`` from an OCI image layout (``oci:DIR:TAG``) for
OCI images, and from skopeo's ``dir:`` format for Docker images, because skopeo 1.9's ``oci:``
transport cannot carry a Docker manifest list (it skips descriptors with Docker media types, and
if the descriptor claims an OCI index it wants to convert the list, which ``--preserve-digests``
refuses). Every digest is computed here before the push; afterwards the tag's bytes on the
registry are compared with ours (``_check_pushed``), which pins the children too, since the top
document names their digests.

Format matrix::

    fmt="oci"     index  application/vnd.oci.image.index.v1+json
                  child  application/vnd.oci.image.manifest.v1+json
                  config application/vnd.oci.image.config.v1+json
                  layer  application/vnd.oci.image.layer.v1.tar+gzip
    fmt="docker"  list   application/vnd.docker.distribution.manifest.list.v2+json
                  child  application/vnd.docker.distribution.manifest.v2+json
                  config application/vnd.docker.container.image.v1+json
                  layer  application/vnd.docker.image.rootfs.diff.tar.gzip

``attestation=True`` (OCI only) adds, per platform, a BuildKit-style attestation manifest with
platform ``unknown/unknown`` and ``vnd.docker.reference.type: attestation-manifest``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tests.harness.tools import require_tool

if TYPE_CHECKING:
    from tests.harness.registry import Registry


class PushTarget(Protocol):
    """Where images go: a ``Registry``, or a ``Front`` (any object with ``host``)."""

    @property
    def host(self) -> str: ...


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"

#: The four manifest types a Docker/containerd client puts in ``Accept``.
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)

_TYPES = {
    "oci": {"index": OCI_INDEX, "manifest": OCI_MANIFEST, "config": OCI_CONFIG, "layer": OCI_LAYER},
    "docker": {
        "index": DOCKER_LIST,
        "manifest": DOCKER_MANIFEST,
        "config": DOCKER_CONFIG,
        "layer": DOCKER_LAYER,
    },
}

SKOPEO_TIMEOUT = 120.0
_EPOCH = 1_700_000_000  # fixed mtime inside the tars: content differs only by the nonce


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Child:
    """One platform manifest (or attestation manifest) inside an index."""

    digest: str
    media_type: str
    raw: bytes
    config_digest: str
    layers: list[str]
    platform: str = ""

    @property
    def size(self) -> int:
        """Length of ``raw``."""
        return len(self.raw)


@dataclass
class SeededImage:
    """An image as pushed: exact bytes of every document and blob, keyed by digest."""

    repository: str
    tag: str
    digest: str
    media_type: str
    raw: bytes
    children: dict[str, Child] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: Attestation manifests keyed by the platform of the image they attest.
    attestations: dict[str, Child] = field(default_factory=dict)
    fmt: str = "oci"

    @property
    def single(self) -> bool:
        """True when the top document is a manifest, not an index."""
        return self.media_type in (OCI_MANIFEST, DOCKER_MANIFEST)

    @property
    def manifests(self) -> dict[str, bytes]:
        """Every manifest document (top, children, attestations) keyed by digest."""
        docs = {self.digest: self.raw}
        for child in (*self.children.values(), *self.attestations.values()):
            docs[child.digest] = child.raw
        return docs

    def child(self, platform: str) -> Child:
        """The child for *platform* (``linux/arm64/v8``); for a single image, its only child."""
        return self.children[platform]

    def layer_bytes(self, platform: str) -> int:
        """Total compressed size of *platform*'s layers."""
        return sum(len(self.blobs[d]) for d in self.children[platform].layers)


def _canonical(doc: dict[str, Any]) -> bytes:
    # Indented like the documents BuildKit and distribution write; what matters is only that
    # the bytes we hash are the bytes we push.
    return json.dumps(doc, indent=3).encode()


def _parse_platform(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], got {platform!r}")
    spec = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        spec["variant"] = parts[2]
    return spec


def _make_layer(platform: str, nonce: str, index: int, size: int) -> tuple[bytes, bytes]:
    """(gzipped tar, uncompressed tar) of roughly *size* compressed bytes."""
    files: list[tuple[str, bytes]] = []
    if index == 0:
        files.append(("etc/regproxy-test", f"platform={platform}\nnonce={nonce}\n".encode()))
    else:
        files.append((f"etc/regproxy-layer-{index}", f"{platform} {nonce} {index}\n".encode()))
    filler = size - 256  # ~what tar headers + gzip framing add to incompressible data
    if filler > 0:
        files.append((f"var/lib/regproxy/filler-{index}.bin", os.urandom(filler)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirname in sorted({os.path.dirname(name) for name, _ in files}):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _EPOCH
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, _EPOCH
            tar.addfile(info, io.BytesIO(data))
    plain = buf.getvalue()
    return gzip.compress(plain, compresslevel=6, mtime=0), plain


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data), **extra}


def _build_platform(
    platform: str, fmt: str, layer_sizes: tuple[int, ...], blobs: dict[str, bytes]
) -> Child:
    if not 1 <= len(layer_sizes) <= 3:
        raise ValueError("an image has 1 to 3 layers")
    types = _TYPES[fmt]
    nonce = secrets.token_hex(16)
    layers: list[bytes] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        gz, plain = _make_layer(platform, nonce, i, size)
        layers.append(gz)
        diff_ids.append(sha256_digest(plain))
    spec = _parse_platform(platform)
    config_doc = {
        **spec,
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.regproxy.test.nonce": nonce},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": f"regproxy-test layer {i}"}
            for i in range(len(layers))
        ],
    }
    config = _canonical(config_doc)
    for blob in (config, *layers):
        blobs[sha256_digest(blob)] = blob
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": types["manifest"],
            "config": _descriptor(types["config"], config),
            "layers": [_descriptor(types["layer"], gz) for gz in layers],
        }
    )
    return Child(
        digest=sha256_digest(manifest),
        media_type=types["manifest"],
        raw=manifest,
        config_digest=sha256_digest(config),
        layers=[sha256_digest(gz) for gz in layers],
        platform=platform,
    )


def _build_attestation(subject: Child, blobs: dict[str, bytes]) -> Child:
    statement = _canonical(
        {
            "_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": "https://spdx.dev/Document",
            "subject": [{"name": "regproxy-test", "digest": {"sha256": subject.digest[7:]}}],
            "predicate": {"spdxVersion": "SPDX-2.3", "name": f"sbom-{secrets.token_hex(8)}"},
        }
    )
    config = _canonical(
        {
            "architecture": "unknown",
            "os": "unknown",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(statement)]},
        }
    )
    blobs[sha256_digest(statement)] = statement
    blobs[sha256_digest(config)] = config
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [
                _descriptor(
                    IN_TOTO,
                    statement,
                    annotations={"in-toto.io/predicate-type": "https://spdx.dev/Document"},
                )
            ],
        }
    )
    return Child(
        digest=sha256_digest(manifest),
        media_type=OCI_MANIFEST,
        raw=manifest,
        config_digest=sha256_digest(config),
        layers=[sha256_digest(statement)],
        platform="unknown/unknown",
    )


def build_image(
    repository: str,
    tag: str,
    *,
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64/v8"),
    fmt: str = "oci",
    layer_sizes: tuple[int, ...] = (2048,),
    single: bool = False,
    attestation: bool = False,
) -> SeededImage:
    """Build an image in memory (nothing is pushed)."""
    if fmt not in _TYPES:
        raise ValueError(f"fmt must be 'oci' or 'docker', got {fmt!r}")
    if attestation and (fmt != "oci" or single):
        raise ValueError("attestation manifests need an OCI index (fmt='oci', single=False)")
    if single and len(platforms) != 1:
        raise ValueError("a single-platform image takes exactly one platform")
    blobs: dict[str, bytes] = {}
    children = {p: _build_platform(p, fmt, layer_sizes, blobs) for p in platforms}
    if single:
        (only,) = children.values()
        return SeededImage(
            repository, tag, only.digest, only.media_type, only.raw, children, blobs, fmt=fmt
        )
    entries: list[dict[str, Any]] = []
    attestations: dict[str, Child] = {}
    for platform, child in children.items():
        entries.append(_descriptor(child.media_type, child.raw, platform=_parse_platform(platform)))
    if attestation:
        for platform, child in children.items():
            att = _build_attestation(child, blobs)
            attestations[platform] = att
            entries.append(
                _descriptor(
                    att.media_type,
                    att.raw,
                    annotations={
                        "vnd.docker.reference.digest": child.digest,
                        "vnd.docker.reference.type": "attestation-manifest",
                    },
                    platform={"architecture": "unknown", "os": "unknown"},
                )
            )
    index = _canonical(
        {"schemaVersion": 2, "mediaType": _TYPES[fmt]["index"], "manifests": entries}
    )
    return SeededImage(
        repository,
        tag,
        sha256_digest(index),
        _TYPES[fmt]["index"],
        index,
        children,
        blobs,
        attestations,
        fmt,
    )


def write_oci_layout(image: SeededImage, directory: Path) -> Path:
    """Write *image* as an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``)."""
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    for digest, data in {**image.blobs, **image.manifests}.items():
        (blob_dir / digest.removeprefix("sha256:")).write_bytes(data)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    top = _descriptor(
        image.media_type,
        image.raw,
        annotations={"org.opencontainers.image.ref.name": image.tag},
    )
    (directory / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]})
    )
    return directory


def _empty_auth_file() -> Path:
    path = Path(tempfile.gettempdir()) / f"regproxy-skopeo-auth-{os.getuid()}.json"
    if not path.exists():
        path.write_text('{"auths": {}}')
    return path


def write_dir_layout(image: SeededImage, directory: Path) -> Path:
    """Write *image* in skopeo's ``dir:`` format (version 1.1).

    ``dir:`` derives each manifest's media type from its ``mediaType`` field, so it carries a
    Docker manifest list faithfully; the ``oci:`` transport does not (see ``push_image``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "version").write_text("Directory Transport Version: 1.1\n")
    (directory / "manifest.json").write_bytes(image.raw)
    for digest, data in image.manifests.items():
        if digest != image.digest:
            (directory / f"{digest.removeprefix('sha256:')}.manifest.json").write_bytes(data)
    for digest, data in image.blobs.items():
        (directory / digest.removeprefix("sha256:")).write_bytes(data)
    return directory


def skopeo(*args: str, timeout: float = SKOPEO_TIMEOUT) -> str:
    """Run ``skopeo ARGS`` and return stdout; raise with stderr on failure."""
    binary = require_tool("skopeo")
    proc = subprocess.run(
        [binary, "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # An empty auth file: the host's ~/.docker/config.json must not leak into tests.
        env={**os.environ, "REGISTRY_AUTH_FILE": str(_empty_auth_file())},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _creds_args(flag: str, creds: tuple[str, str] | None) -> list[str]:
    return [flag, f"{creds[0]}:{creds[1]}"] if creds else []


def _default_creds(registry: PushTarget, creds: tuple[str, str] | None) -> tuple[str, str] | None:
    if creds is not None:
        return creds
    htpasswd: tuple[str, str] | None = getattr(registry, "htpasswd", None)
    return htpasswd


def inspect_raw(
    registry: PushTarget, reference: str, *, creds: tuple[str, str] | None = None
) -> bytes:
    """``skopeo inspect --raw docker://HOST/REFERENCE`` (bytes exactly as the registry has them)."""
    out = skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        *_creds_args("--creds", _default_creds(registry, creds)),
        f"docker://{registry.host}/{reference}",
    )
    return out.encode()


def _check_pushed(
    registry: PushTarget, image: SeededImage, tag: str, creds: tuple[str, str] | None
) -> None:
    raw = inspect_raw(registry, f"{image.repository}:{tag}", creds=creds)
    if raw != image.raw:
        raise AssertionError(
            f"skopeo changed {image.repository}:{tag} while pushing: expected "
            f"{image.digest}, registry has {sha256_digest(raw)}"
        )


def push_image(
    registry: PushTarget,
    image: SeededImage,
    *,
    creds: tuple[str, str] | None = None,
    workdir: Path | None = None,
) -> SeededImage:
    """Push a built image with skopeo and assert the registry holds exactly our bytes.

    OCI images go through an OCI image layout (``oci:``). Docker-format images go through
    ``dir:`` instead: skopeo 1.9's ``oci:`` transport only resolves descriptors with OCI media
    types, and when told the list is an OCI index it insists on converting it, which
    ``--preserve-digests`` (rightly) refuses.
    """
    creds = _default_creds(registry, creds)
    with tempfile.TemporaryDirectory(prefix="regproxy-img-", dir=workdir) as tmp:
        if image.fmt == "oci":
            source = f"oci:{write_oci_layout(image, Path(tmp) / 'layout')}:{image.tag}"
        else:
            source = f"dir:{write_dir_layout(image, Path(tmp) / 'layout')}"
        skopeo(
            "copy",
            "--all",
            "--preserve-digests",
            "--quiet",
            "--dest-tls-verify=false",
            *_creds_args("--dest-creds", creds),
            source,
            f"docker://{registry.host}/{image.repository}:{image.tag}",
        )
    _check_pushed(registry, image, image.tag, creds)
    return image


def seed_image(
    registry: PushTarget,
    repository: str,
    tag: str,
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64/v8"),
    fmt: str = "oci",
    layer_sizes: tuple[int, ...] = (2048,),
    single: bool = False,
    attestation: bool = False,
    creds: tuple[str, str] | None = None,
) -> SeededImage:
    """Build a fresh image and push it to *registry* as ``repository:tag``.

    *layer_sizes* gives each layer's approximate compressed size in bytes (1-3 layers);
    *single* pushes a bare manifest (exactly one platform). *creds* default to the registry's
    htpasswd credentials, if any; a token registry needs a user of its issuer.
    """
    image = build_image(
        repository,
        tag,
        platforms=platforms,
        fmt=fmt,
        layer_sizes=layer_sizes,
        single=single,
        attestation=attestation,
    )
    return push_image(registry, image, creds=creds)


def tag_image(
    registry: PushTarget,
    image: SeededImage,
    new_tag: str,
    *,
    repository: str | None = None,
    creds: tuple[str, str] | None = None,
) -> SeededImage:
    """Copy an already pushed image to another tag (and optionally repository), unchanged.

    Returns a ``SeededImage`` for the new reference sharing the same documents and blobs.
    """
    creds = _default_creds(registry, creds)
    target = repository or image.repository
    skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *_creds_args("--src-creds", creds),
        *_creds_args("--dest-creds", creds),
        f"docker://{registry.host}/{image.repository}@{image.digest}",
        f"docker://{registry.host}/{target}:{new_tag}",
    )
    copy = SeededImage(
        target,
        new_tag,
        image.digest,
        image.media_type,
        image.raw,
        dict(image.children),
        dict(image.blobs),
        dict(image.attestations),
        image.fmt,
    )
    _check_pushed(registry, copy, new_tag, creds)
    return copy


# -- the standard upstream seeded once per test session -------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """Arguments of one ``seed_image`` call, for the session-scoped upstream."""

    reference: str
    platforms: tuple[str, ...]
    fmt: str = "oci"
    single: bool = False
    attestation: bool = False
    layer_sizes: tuple[int, ...] = (2048,)


#: What ``seed_standard_images`` pushes; keys of ``SeededRegistry.images``.
STANDARD_IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("library/alpine:3.19", ("linux/amd64", "linux/arm64/v8", "linux/arm/v7")),
    ImageSpec("library/busybox:1.36", ("linux/amd64", "linux/arm64/v8"), fmt="docker"),
    ImageSpec("library/hello:latest", ("linux/amd64",), single=True),
    ImageSpec("library/mysql:5.7", ("linux/amd64",)),
    ImageSpec("mysql/mysql-server:5.7", ("linux/arm64/v8",), fmt="docker"),
    ImageSpec("myteam/app:1.0-amd64", ("linux/amd64",), single=True),
    ImageSpec("myteam/app:1.0-arm64", ("linux/arm64/v8",), single=True),
    # Like today's official images: an OCI index that also lists attestation manifests.
    ImageSpec(
        "library/redis:7",
        ("linux/amd64", "linux/arm64/v8"),
        attestation=True,
        layer_sizes=(64 * 1024, 2048),
    ),
)


@dataclass
class SeededRegistry:
    """A registry plus the images pushed to it, keyed ``"repository:tag"``."""

    registry: Registry
    images: dict[str, SeededImage]

    @property
    def url(self) -> str:
        """The registry's ``http://127.0.0.1:PORT``."""
        return self.registry.url

    @property
    def host(self) -> str:
        """The registry's ``127.0.0.1:PORT``."""
        return self.registry.host

    def __getitem__(self, reference: str) -> SeededImage:
        return self.images[reference]


def seed_standard_images(
    registry: PushTarget,
    specs: tuple[ImageSpec, ...] = STANDARD_IMAGES,
    *,
    creds: tuple[str, str] | None = None,
) -> dict[str, SeededImage]:
    """Push *specs* concurrently (one skopeo each) and return them keyed by reference."""

    def push(spec: ImageSpec) -> SeededImage:
        repository, _, tag = spec.reference.rpartition(":")
        return seed_image(
            registry,
            repository,
            tag,
            platforms=spec.platforms,
            fmt=spec.fmt,
            layer_sizes=spec.layer_sizes,
            single=spec.single,
            attestation=spec.attestation,
            creds=creds,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(push, specs))
    return {spec.reference: image for spec, image in zip(specs, results, strict=True)}
