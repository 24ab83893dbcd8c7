"""Cosign signatures made with a key, verified as cosign verifies them.

Where cosign puts a signature of ``repo@sha256:<hex>`` (its SIGNATURE_SPEC):

* tag-based discovery: an image manifest tagged ``sha256-<hex>.sig`` in the same repository;
* OCI 1.1: a manifest whose ``subject`` is the image, with ``artifactType``
  ``application/vnd.dev.cosign.artifact.sig.v1+json`` (or the simple-signing type), found
  through the referrers API.

Each signature is a layer of that manifest::

    {"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
     "digest": "sha256:<payload>", "size": 245,
     "annotations": {"dev.cosignproject.cosign/signature": "<base64 signature>"}}

The layer's blob (the payload) is a simple-signing JSON document whose
``critical.image.docker-manifest-digest`` names the signed manifest. A layer verifies when, in
this order: the payload's bytes hash to the descriptor's digest and size; the signature
verifies over those exact bytes with one of the keys (ECDSA with SHA-256 and an ASN.1 DER
signature, Ed25519 over the bytes, RSA PKCS#1 v1.5 with SHA-256: what cosign's ``--key``
signing produces); and the payload names the digest being checked. Nothing else of the
payload is trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from proxy.trust.settings import TrustKey

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
#: The ``artifactType``s of a cosign signature among a manifest's referrers.
SIGNATURE_ARTIFACT_TYPES = frozenset({SIMPLE_SIGNING, SIG_ARTIFACT})
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
#: Payloads are a few hundred bytes; anything much larger is not a signature payload.
MAX_PAYLOAD = 64 * 1024
MAX_SIGNATURE_LAYERS = 64


def signature_tag(digest: str) -> str:
    """``sha256:<hex>`` -> ``sha256-<hex>.sig``: where cosign stores the signatures."""
    return digest.replace(":", "-") + ".sig"


@dataclass(frozen=True)
class SignatureLayer:
    """One signature of a signature manifest: its payload's descriptor and the signature."""

    digest: str
    size: int
    signature: bytes


class Outcome(Enum):
    """What one signature layer proved (the best outcome names the refusal's reason)."""

    VERIFIED = "verified"
    WRONG_DIGEST = "signed, but over another digest"
    BAD_SIGNATURE = "no signature by these keys"
    BAD_PAYLOAD = "signature payload does not match its descriptor"


def signature_layers(manifest: bytes) -> list[SignatureLayer]:
    """The simple-signing layers of a signature manifest that carry a signature."""
    try:
        doc = json.loads(manifest)
    except (ValueError, UnicodeDecodeError):
        return []
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        return []
    found: list[SignatureLayer] = []
    for layer in layers[:MAX_SIGNATURE_LAYERS]:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        digest, size = layer.get("digest"), layer.get("size")
        annotations = layer.get("annotations")
        encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
        if (
            not isinstance(digest, str)
            or not digest.startswith("sha256:")
            or not isinstance(size, int)
            or isinstance(size, bool)
            or not 0 <= size <= MAX_PAYLOAD
            or not isinstance(encoded, str)
        ):
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append(SignatureLayer(digest, size, signature))
    return found


def verify_signature(key: TrustKey, signature: bytes, payload: bytes) -> bool:
    """Does ``signature`` verify over ``payload`` with ``key``?"""
    public_key = key.public_key
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, payload)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def signed_digest(payload: bytes) -> str | None:
    """``critical.image.docker-manifest-digest`` of a simple-signing payload (keys matched
    without regard to case, as cosign's JSON decoding does), or None."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    critical = _field(doc, "critical")
    image = _field(critical, "image")
    digest = _field(image, "docker-manifest-digest")
    return digest if isinstance(digest, str) else None


def _field(doc: Any, name: str) -> Any:
    if not isinstance(doc, dict):
        return None
    if name in doc:
        return doc[name]
    for key, value in doc.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def verify_layer(
    layer: SignatureLayer, payload: bytes, digest: str, keys: tuple[TrustKey, ...]
) -> tuple[Outcome, TrustKey | None]:
    """Check one signature layer against the digest being verified (see the module doc)."""
    if len(payload) != layer.size or "sha256:" + hashlib.sha256(payload).hexdigest() != (
        layer.digest
    ):
        return Outcome.BAD_PAYLOAD, None
    signer = next((k for k in keys if verify_signature(k, layer.signature, payload)), None)
    if signer is None:
        return Outcome.BAD_SIGNATURE, None
    if signed_digest(payload) != digest:
        return Outcome.WRONG_DIGEST, signer
    return Outcome.VERIFIED, signer


#: Which outcome explains a refusal best when several signatures failed.
OUTCOME_RANK = {
    Outcome.WRONG_DIGEST: 3,
    Outcome.BAD_PAYLOAD: 2,
    Outcome.BAD_SIGNATURE: 1,
}
