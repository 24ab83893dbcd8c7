"""Push blobs and manifests to a registry over plain HTTP, byte for byte.

skopeo re-serializes nothing, but it cannot push an arbitrary document (an artifact manifest
with ``subject``, an index of referrers) under a chosen tag. These helpers speak the push API
directly: ``POST /v2/<name>/blobs/uploads/`` then ``PUT <location>?digest=``, and ``PUT
/v2/<name>/manifests/<reference>`` with the document's media type. Every call is bounded by a
timeout and raises on an unexpected status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urljoin

TIMEOUT = 30.0

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    creds: tuple[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers or {})
    if creds is not None:
        hdrs["Authorization"] = "Basic " + base64.b64encode(":".join(creds).encode()).decode()
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def push_blob(
    base_url: str, repository: str, data: bytes, creds: tuple[str, str] | None = None
) -> str:
    """Upload ``data`` as a blob of ``repository``; returns its digest."""
    digest = sha256_digest(data)
    status, headers, body = _request(
        "POST", f"{base_url}/v2/{repository}/blobs/uploads/", body=b"", creds=creds
    )
    if status != 202:
        raise RuntimeError(f"blob upload start: {status} {body[:300]!r}")
    location = urljoin(base_url + "/", headers["Location"])
    sep = "&" if "?" in location else "?"
    status, _, body = _request(
        "PUT",
        f"{location}{sep}{urlencode({'digest': digest})}",
        body=data,
        headers={"Content-Type": "application/octet-stream"},
        creds=creds,
    )
    if status != 201:
        raise RuntimeError(f"blob upload {digest}: {status} {body[:300]!r}")
    return digest


def push_manifest(
    base_url: str,
    repository: str,
    reference: str,
    data: bytes,
    media_type: str,
    creds: tuple[str, str] | None = None,
) -> str:
    """PUT ``data`` as ``repository:reference`` (a tag or its digest); returns its digest."""
    status, _, body = _request(
        "PUT",
        f"{base_url}/v2/{repository}/manifests/{reference}",
        body=data,
        headers={"Content-Type": media_type},
        creds=creds,
    )
    if status != 201:
        raise RuntimeError(f"manifest push {repository}:{reference}: {status} {body[:300]!r}")
    return sha256_digest(data)


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data), **extra}


def canonical(doc: dict[str, Any]) -> bytes:
    """Compact, key-ordered JSON: the bytes a digest is taken of."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
