"""Repository names, tags and digests: the OCI distribution grammar, checked before anything else.

Everything a client puts in a path is validated here, before it reaches the upstream or the disk.
A value that passes can be used as a path component: names are lowercase alphanumerics joined by
``.``, ``_``, ``__``, ``-`` and ``/``; tags and digests have no ``/`` and cannot be ``.`` or ``..``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from proxy.core.errors import DigestInvalid, ManifestInvalid, ManifestUnknown, NameInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

#: Hex lengths of the algorithms we can verify; anything else is refused as DIGEST_INVALID.
DIGEST_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

#: distribution refuses names longer than this (NAME_INVALID).
MAX_NAME_LENGTH = 255


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise NameInvalid({"name": name[:300]})
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise ManifestInvalid({"tag": tag[:300]}, message="invalid tag")
    return tag


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``; else DIGEST_INVALID."""
    algorithm, _, hexpart = digest.partition(":")
    expected = DIGEST_ALGORITHMS.get(algorithm)
    if expected is None or len(hexpart) != expected or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise DigestInvalid({"digest": digest[:300]}, message="invalid or unsupported digest")
    return digest


def check_reference(reference: str) -> str:
    """A manifest reference: a tag or a digest.

    A reference that is no valid tag cannot name a manifest anywhere, so it is
    ``MANIFEST_UNKNOWN`` (404, as the OCI conformance suite expects of ``.INVALID_MANIFEST_NAME``),
    answered without asking upstream; a malformed digest stays ``DIGEST_INVALID`` (400).
    """
    if is_digest(reference):
        return check_digest(reference)
    if not TAG_RE.fullmatch(reference):
        raise ManifestUnknown({"tag": reference[:300]}, message="manifest unknown: invalid tag")
    return reference


def hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object for ``digest``'s algorithm (already validated)."""
    return hashlib.new(digest.partition(":")[0])


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Reference:
    """``[upstream/]repository[:tag|@digest]`` as users write images on the command line."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or 'latest'}"


def parse_image(image: str) -> Reference:
    """Parse ``name[:tag][@digest]`` (no defaulting of the registry host; callers route it)."""
    name, _, digest = image.partition("@")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        check_tag(tag)
    if digest:
        check_digest(digest)
    check_name(name)
    return Reference(name, tag, digest or None)
