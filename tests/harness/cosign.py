"""Cosign signatures made here, byte for byte as ``cosign sign --key`` stores them.

The real ``cosign`` cannot be installed on the test machines (no Debian package; no package on
PyPI or npm ships its binary; no Go module proxy), so this module follows cosign's
SIGNATURE_SPEC with ``cryptography``:

* the payload is the simple-signing JSON ``cosign sign`` writes (compact, Go's field order)::

      {"critical":{"identity":{"docker-reference":"<host>/<repo>"},
                   "image":{"docker-manifest-digest":"sha256:…"},
                   "type":"cosign container image signature"},"optional":null}

* the signature is over those exact bytes: ECDSA P-256 with SHA-256 (ASN.1 DER), Ed25519, or
  RSA PKCS#1 v1.5 with SHA-256, base64-encoded in the layer annotation
  ``dev.cosignproject.cosign/signature``;
* the payload is pushed as a blob and named by a layer of media type
  ``application/vnd.dev.cosign.simplesigning.v1+json`` in an OCI image manifest (config: the
  minimal image config cosign writes, whose ``rootfs.diff_ids`` lists the payloads), tagged
  ``sha256-<hex>.sig`` in the image's repository; more signatures are more layers;
* ``referrer=True`` stores it the OCI 1.1 way instead: a manifest with ``artifactType``
  ``application/vnd.dev.cosign.artifact.sig.v1+json`` and ``subject`` the image, listed in the
  referrers fallback tag ``sha256-<hex>`` (the registry here, distribution 2.8, has no
  referrers API), as cosign's ``--registry-referrers-mode=oci-1-1`` does on such registries.

Deliberately broken signatures for the refusal tests: ``over=`` signs a payload naming another
digest; ``tamper=True`` changes the payload after signing (the descriptor names the changed
bytes, the signature is over the original ones).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tests.harness.push import (
    OCI_EMPTY,
    canonical,
    descriptor,
    push_blob,
    push_manifest,
    sha256_digest,
)

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass
class CosignKey:
    """A key pair; ``public_pem`` is what ``cosign generate-key-pair`` writes as cosign.pub."""

    kind: str
    private: PrivateKey = field(repr=False)

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write_public(self, path: Path) -> Path:
        path.write_bytes(self.public_pem)
        return path

    def sign(self, payload: bytes) -> bytes:
        key = self.private
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(payload, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(payload)
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())


def generate_key(kind: str = "ecdsa") -> CosignKey:
    """``ecdsa`` (P-256, cosign's default), ``ed25519`` or ``rsa`` (3072 bits)."""
    if kind == "ecdsa":
        return CosignKey(kind, ec.generate_private_key(ec.SECP256R1()))
    if kind == "ed25519":
        return CosignKey(kind, ed25519.Ed25519PrivateKey.generate())
    if kind == "rsa":
        return CosignKey(kind, rsa.generate_private_key(public_exponent=65537, key_size=3072))
    raise ValueError(f"unknown key kind {kind!r}")


def payload(reference: str, digest: str) -> bytes:
    """The simple-signing payload cosign signs for ``reference`` (``host/repo``) at ``digest``."""
    doc = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Signature:
    """One signature layer: the payload bytes as pushed and the base64 signature."""

    payload: bytes
    signature_b64: str

    def layer(self) -> dict[str, Any]:
        return descriptor(
            SIMPLE_SIGNING, self.payload, annotations={SIGNATURE_ANNOTATION: self.signature_b64}
        )


def make_signature(
    key: CosignKey, reference: str, digest: str, *, over: str | None = None, tamper: bool = False
) -> Signature:
    signed = payload(reference, over or digest)
    signature = base64.b64encode(key.sign(signed)).decode()
    pushed = (
        signed.replace(b'"optional":null', b'"optional":{"tampered":"yes"}') if tamper else (signed)
    )
    return Signature(pushed, signature)


def _config(payloads: list[bytes]) -> bytes:
    # The image config cosign writes for a signature manifest.
    doc = {
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(p) for p in payloads]},
        "config": {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(
    base_url: str,
    repository: str,
    digest: str,
    keys: list[CosignKey] | CosignKey,
    *,
    over: str | None = None,
    tamper: bool = False,
    referrer: bool = False,
    subject_type: str = OCI_INDEX,
    subject_size: int = 0,
) -> bytes:
    """Sign ``repository@digest`` with each key and push the signature manifest; its bytes."""
    keys = keys if isinstance(keys, list) else [keys]
    host = base_url.split("://", 1)[-1]
    signatures = [
        make_signature(k, f"{host}/{repository}", digest, over=over, tamper=tamper) for k in keys
    ]
    for s in signatures:
        push_blob(base_url, repository, s.payload)
    layers = [s.layer() for s in signatures]
    if referrer:
        push_blob(base_url, repository, b"{}")
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SIG_ARTIFACT,
            "config": descriptor(OCI_EMPTY, b"{}"),
            "layers": layers,
            "subject": {"mediaType": subject_type, "digest": digest, "size": subject_size},
        }
        data = canonical(doc)
        manifest_digest = push_manifest(
            base_url, repository, sha256_digest(data), data, OCI_MANIFEST
        )
        index = canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{**descriptor(OCI_MANIFEST, data), "artifactType": SIG_ARTIFACT}],
            }
        )
        assert manifest_digest == sha256_digest(data)
        push_manifest(base_url, repository, digest.replace(":", "-"), index, OCI_INDEX)
        return data
    config = _config([s.payload for s in signatures])
    push_blob(base_url, repository, config)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": layers,
    }
    data = canonical(doc)
    push_manifest(base_url, repository, digest.replace(":", "-") + ".sig", data, OCI_MANIFEST)
    return data
