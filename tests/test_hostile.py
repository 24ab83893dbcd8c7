"""Hostile and malformed input (issue #6): from clients, and from a misbehaving upstream.

Client side: a table of bad requests sent over raw sockets (so every byte of the request line
is exactly as written: no client-side normalization), slowloris clients, clients that vanish
mid-transfer. Each bad request gets the right registry error (JSON envelope, right code) or is
refused by the HTTP parser before the application sees it (a plain ``400`` and a closed
connection); the server stays up, the upstream is not asked, and nothing is written outside
the storage directory.

Upstream side: a ``Front`` ``Status`` fault with a crafted body and headers stands in for an
upstream that sends invalid manifests (a real registry refuses them on push).

Credentials: with ``--upstream-username`` and ``REGPROXY_UPSTREAM_PASSWORD`` set, the password
(and its base64 forms, and the Bearer tokens it buys) never shows up in the log, in a response
or in the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cache.sendfile import NOTSENT_LOWAT, sendfile_to_transport
from tests.harness.front import (
    Drip,
    Front,
    RedirectTo,
    Status,
    all_of,
    any_request,
    blob,
    method_is,
    path_contains,
    too_many_requests,
)
from tests.harness.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SeededRegistry,
    seed_image,
)
from tests.harness.proxyproc import ProxyProcess
from tests.harness.registry import Registry
from tests.test_faults import (
    MiB,
    Outcome,
    eventually,
    manifest_file,
    request,
    sha256,
    stored_blobs_verify,
)

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]

#: Marker in every traversal attempt: no file or directory by this name may appear anywhere.
MARK = "rpxpwn"
Z64 = "0" * 64


# -- raw HTTP ------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """What came back on a raw connection; ``status`` None if it closed without an answer."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    @property
    def json_code(self) -> str | None:
        if not self.headers.get("content-type", "").startswith("application/json"):
            return None
        try:
            doc = json.loads(self.body)
            entry = doc["errors"][0]
            assert isinstance(entry["message"], str)
            return str(entry["code"])
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            return "MALFORMED-ENVELOPE"

    def outcome(self) -> tuple[object, ...]:
        """``("cut",)``, ``(status, CODE)`` for a JSON envelope, else ``("raw", status)``;
        a 2xx is ``(status, None)``."""
        if self.status is None:
            return ("cut",)
        if 200 <= self.status < 300:
            return (self.status, None)
        code = self.json_code
        if code is not None:
            return (self.status, code)
        return ("raw", self.status)

    def __repr__(self) -> str:
        return (
            f"RawResponse({self.status}, {self.headers.get('content-type')}, {self.body[:300]!r})"
        )


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def parse_raw(data: bytes, method: str = "GET") -> RawResponse:
    if not data.startswith(b"HTTP/"):
        return RawResponse(None, raw=data)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD":
        body = b""
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(status, headers, body, data)


async def raw_exchange(
    port: int, data: bytes, *, method: str = "GET", within: float = 10
) -> RawResponse:
    """Send *data* on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        deadline = time.monotonic() + within
        while True:
            chunk = await asyncio.wait_for(
                reader.read(65536), max(0.01, deadline - time.monotonic())
            )
            if not chunk:
                break
            out += chunk
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_raw(out, method)


def http_request(
    method: str, target: str | bytes, headers: bytes = b"", body: bytes = b""
) -> bytes:
    if isinstance(target, str):
        target = target.encode()
    return (
        method.encode()
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: regproxy.test\r\nConnection: close\r\n"
        + headers
        + b"\r\n"
        + body
    )


# -- the module's proxy ------------------------------------------------------------------------


@dataclass
class Hostile:
    proxy: ProxyProcess
    upstream: Front
    outer: Path
    seeded: SeededRegistry

    def snapshot(self) -> set[str]:
        """Every path under ``outer`` except inside the storage directory."""
        storage = self.proxy.storage
        found = set()
        for root, dirs, files in os.walk(self.outer):
            here = Path(root)
            if here == storage or storage in here.parents:
                dirs[:] = []
                continue
            for name in dirs + files:
                found.add(str((here / name).relative_to(self.outer)))
        return found


@pytest.fixture(scope="module")
def hostile(
    seeded_registry: SeededRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """One proxy for the request table; storage 2 levels down ``outer`` (its log elsewhere)."""
    outer = tmp_path_factory.mktemp("hostile-outer")
    logs = tmp_path_factory.mktemp("hostile-logs")
    upstream = Front(seeded_registry.registry)
    upstream.start()
    proxy = ProxyProcess(upstream.url, outer / "a" / "storage", log_path=logs / "proxy.log")
    try:
        proxy.start()
        yield Hostile(proxy, upstream, outer, seeded_registry)
    finally:
        proxy.stop()
        upstream.stop()


# -- the table -----------------------------------------------------------------------------------

PARSER = ("raw", 400)  # refused by aiohttp's HTTP parser before the application
CUT = ("cut",)


def err(status: int, code: str) -> tuple[int, str]:
    return (status, code)


NAME_INVALID = err(400, "NAME_INVALID")
TAG_INVALID = err(400, "MANIFEST_INVALID")
#: A manifest reference that is no valid tag names nothing: 404, never asked of upstream.
REF_UNKNOWN = err(404, "MANIFEST_UNKNOWN")
DIGEST_INVALID = err(400, "DIGEST_INVALID")
NOT_FOUND = err(404, "NOT_FOUND")
UNSUPPORTED = err(405, "UNSUPPORTED")
RANGE_REFUSED = {("raw", 416), err(416, "RANGE_INVALID")}


@dataclass
class Case:
    id: str
    method: str
    target: str | bytes
    expect: AbstractSet[tuple[object, ...]]
    headers: bytes = b""
    body: bytes = b""
    #: The request is well-formed and may legitimately be asked of the upstream.
    upstream_ok: bool = False
    #: A reason to expect failure (a proxy bug): the case is marked xfail(strict=True).
    bug: str | None = None
    check: Callable[[RawResponse, Hostile], None] | None = None
    #: Fill in ``{blob}`` (a cached layer) / ``{cold}`` (a layer nobody asked for yet).
    needs: str = ""


def _is_index(resp: RawResponse, h: Hostile) -> None:
    assert resp.headers["content-type"] == OCI_INDEX, resp


def _is_manifest(resp: RawResponse, h: Hostile) -> None:
    assert resp.headers["content-type"] == OCI_MANIFEST, resp


def _full_or_refused_range(resp: RawResponse, h: Hostile) -> None:
    if resp.status == 416:
        assert resp.headers.get("content-range", "").startswith("bytes */"), resp


MANIFEST_V2_LINE = f"Accept: {DOCKER_MANIFEST}\r\n".encode()
INDEX_LINE = f"Accept: {OCI_INDEX}\r\n".encode()
OCI_MANIFEST_LINE = f"Accept: {OCI_MANIFEST}\r\n".encode()

CASES: list[Case] = [
    # -- path traversal, every encoding --------------------------------------------------------
    Case("dotdot-root", "GET", "/v2/../../../etc/passwd", {NOT_FOUND, NAME_INVALID, PARSER}),
    Case(
        "dotdot-name",
        "GET",
        f"/v2/library/../../../../tmp/{MARK}/manifests/1",
        {NAME_INVALID, NOT_FOUND},
    ),
    Case("pct2e-name", "GET", f"/v2/library/%2e%2e/%2e%2e/{MARK}/manifests/1", {NAME_INVALID}),
    Case("pct2E-upper", "GET", f"/v2/library/%2E%2E/{MARK}/manifests/1", {NAME_INVALID}),
    Case("pct2f-name", "GET", f"/v2/library%2f..%2f..%2f{MARK}/manifests/1", {NAME_INVALID}),
    Case(
        "pct2F-slash-only",
        "GET",
        f"/v2/library%2F{MARK}/manifests/1",
        {NAME_INVALID, err(404, "MANIFEST_UNKNOWN"), err(404, "NAME_UNKNOWN")},
        upstream_ok=True,
    ),
    Case("double-encoded", "GET", f"/v2/library/%252e%252e/{MARK}/manifests/1", {NAME_INVALID}),
    Case(
        "double-encoded-slash", "GET", f"/v2/library%252f..%252f{MARK}/manifests/1", {NAME_INVALID}
    ),
    Case("backslash-raw", "GET", f"/v2/library/..\\..\\{MARK}/manifests/1", {NAME_INVALID, PARSER}),
    Case("backslash-pct", "GET", f"/v2/library/%5c..%5c..%5c{MARK}/manifests/1", {NAME_INVALID}),
    Case("nul-pct", "GET", f"/v2/library/{MARK}%00x/manifests/1", {NAME_INVALID}),
    Case("nul-raw", "GET", f"/v2/library/{MARK}\x00x/manifests/1".encode(), {PARSER, CUT}),
    Case(
        "unicode-one-dot-leader",
        "GET",
        "/v2/library/%E2%80%A4%E2%80%A4/manifests/1",
        {NAME_INVALID},
    ),
    Case(
        "unicode-fullwidth-stop",
        "GET",
        "/v2/library/%EF%BC%8E%EF%BC%8E/manifests/1",
        {NAME_INVALID},
    ),
    Case("utf8-overlong-dot", "GET", "/v2/library/%C0%AE%C0%AE/manifests/1", {NAME_INVALID}),
    Case("invalid-utf8", "GET", "/v2/library/%ff%fe/manifests/1", {NAME_INVALID}),
    Case(
        "raw-utf8-dots",
        "GET",
        "/v2/library/\u2024\u2024/manifests/1".encode(),
        {NAME_INVALID, PARSER},
    ),
    Case("tag-dotdot", "GET", "/v2/library/alpine/manifests/..", {REF_UNKNOWN, NOT_FOUND}),
    Case("tag-pct2e", "GET", "/v2/library/alpine/manifests/%2e%2e", {REF_UNKNOWN}),
    Case("tag-half-encoded", "GET", "/v2/library/alpine/manifests/.%2e", {REF_UNKNOWN}),
    Case(
        "tag-pct2f",
        "GET",
        f"/v2/library/alpine/manifests/..%2f..%2f{MARK}",
        {REF_UNKNOWN, NOT_FOUND},
    ),
    Case("tag-backslash", "GET", f"/v2/library/alpine/manifests/..%5c{MARK}", {REF_UNKNOWN}),
    Case(
        "digest-pct2f",
        "GET",
        f"/v2/library/alpine/blobs/sha256:..%2f..%2f{MARK}",
        {DIGEST_INVALID, NOT_FOUND},
    ),
    Case("digest-dotdot", "GET", "/v2/library/alpine/blobs/sha256:%2e%2e", {DIGEST_INVALID}),
    Case(
        "digest-backslash", "GET", f"/v2/library/alpine/blobs/sha256:..%5c{MARK}", {DIGEST_INVALID}
    ),
    Case("tags-list-dotdot", "GET", "/v2/../tags/list", {NAME_INVALID, NOT_FOUND}),
    Case("tags-list-pct2e", "GET", "/v2/library/%2e%2e/tags/list", {NAME_INVALID}),
    Case(
        "upstream-prefix-dotdot",
        "GET",
        f"/v2/docker.io/%2e%2e/%2e%2e/{MARK}/manifests/1",
        {NAME_INVALID},
    ),
    Case(
        "ns-dotdot",
        "GET",
        f"/v2/library/alpine/manifests/1?ns=../../{MARK}",
        {err(404, "NAME_UNKNOWN"), NAME_INVALID},
    ),
    Case(
        "ns-pct",
        "GET",
        "/v2/library/alpine/manifests/1?ns=%2e%2e%2f%2e%2e",
        {err(404, "NAME_UNKNOWN"), NAME_INVALID},
    ),
    Case("inspect-dotdot", "GET", "/_regproxy/inspect?image=../../etc/passwd", {NAME_INVALID}),
    Case(
        "inspect-tag-dotdot",
        "GET",
        "/_regproxy/inspect?image=library/alpine:..%2f..",
        {NAME_INVALID, TAG_INVALID},
    ),
    Case("inspect-empty", "GET", "/_regproxy/inspect", {NAME_INVALID}),
    # -- lengths -------------------------------------------------------------------------------
    Case("name-256", "GET", "/v2/" + "a" * 256 + "/manifests/1", {NAME_INVALID}),
    Case(
        "name-300-components",
        "GET",
        "/v2/" + "/".join(["abcdefghij"] * 30) + "/manifests/1",
        {NAME_INVALID},
    ),
    Case("name-10000", "GET", "/v2/" + "a" * 10_000 + "/manifests/1", {PARSER, NAME_INVALID, CUT}),
    Case("tag-129", "GET", "/v2/library/alpine/manifests/" + "t" * 129, {REF_UNKNOWN}),
    Case(
        "tag-128",
        "GET",
        "/v2/library/alpine/manifests/" + "t" * 128,
        {err(404, "MANIFEST_UNKNOWN")},
        upstream_ok=True,
    ),
    Case("tag-5000", "GET", "/v2/library/alpine/manifests/" + "t" * 5000, {REF_UNKNOWN}),
    Case(
        "query-10000",
        "GET",
        "/v2/library/alpine/tags/list?n=" + "9" * 10_000,
        {PARSER, TAG_INVALID, CUT},
    ),
    Case("tags-list-n-huge", "GET", "/v2/library/alpine/tags/list?n=" + "9" * 50, {TAG_INVALID}),
    # -- digests -------------------------------------------------------------------------------
    Case("md5", "GET", "/v2/library/alpine/blobs/md5:" + "0" * 32, {DIGEST_INVALID}),
    Case("sha256-short", "GET", "/v2/library/alpine/blobs/sha256:" + "0" * 63, {DIGEST_INVALID}),
    Case("sha256-long", "GET", "/v2/library/alpine/blobs/sha256:" + "0" * 65, {DIGEST_INVALID}),
    Case(
        "sha256-upper-hex", "GET", "/v2/library/alpine/blobs/sha256:" + "A" * 64, {DIGEST_INVALID}
    ),
    Case("sha256-not-hex", "GET", "/v2/library/alpine/blobs/sha256:" + "g" * 64, {DIGEST_INVALID}),
    Case("sha256-empty", "GET", "/v2/library/alpine/blobs/sha256:", {DIGEST_INVALID}),
    Case("algorithm-empty", "GET", "/v2/library/alpine/blobs/:" + Z64, {DIGEST_INVALID}),
    Case("algorithm-upper", "GET", "/v2/library/alpine/blobs/SHA256:" + Z64, {DIGEST_INVALID}),
    Case("sha384-unknown", "GET", "/v2/library/alpine/blobs/sha384:" + "0" * 96, {DIGEST_INVALID}),
    Case("blake3-unknown", "GET", "/v2/library/alpine/manifests/blake3:" + Z64, {DIGEST_INVALID}),
    Case("double-colon", "GET", "/v2/library/alpine/blobs/sha256::" + Z64, {DIGEST_INVALID}),
    Case(
        "sha512-valid-unknown-blob",
        "GET",
        "/v2/library/alpine/blobs/sha512:" + "0" * 128,
        {err(404, "BLOB_UNKNOWN")},
        upstream_ok=True,
    ),
    Case(
        "sha512-valid-unknown-manifest",
        "GET",
        "/v2/library/alpine/manifests/sha512:" + "0" * 128,
        {err(404, "MANIFEST_UNKNOWN")},
        upstream_ok=True,
    ),
    Case("manifest-md5", "GET", "/v2/library/alpine/manifests/md5:" + "0" * 32, {DIGEST_INVALID}),
    # -- headers -------------------------------------------------------------------------------
    Case(
        "accept-9k",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {PARSER, CUT},
        headers=b"Accept: " + b"a" * 9000 + b"\r\n",
    ),
    Case(
        "accept-malformed",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {(200, None)},
        headers=b"Accept: ;;;,,,==;q=x, */*;;\r\n",
        upstream_ok=True,
        check=_is_index,
    ),
    Case(
        "accept-control-chars",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {(200, None), PARSER},
        headers=b"Accept: \x01\x02\x7f\r\n",
        upstream_ok=True,
    ),
    Case(
        "accept-lines-index-second",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {(200, None)},
        headers=MANIFEST_V2_LINE + OCI_MANIFEST_LINE + INDEX_LINE,
        upstream_ok=True,
        check=_is_index,
    ),
    Case(
        "accept-lines-no-index",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {(200, None)},
        headers=MANIFEST_V2_LINE + OCI_MANIFEST_LINE,
        upstream_ok=True,
        check=_is_manifest,
    ),
    Case("header-9k", "GET", "/v2/", {PARSER, CUT}, headers=b"X-Big: " + b"a" * 9000 + b"\r\n"),
    Case(
        "headers-500",
        "GET",
        "/v2/",
        {PARSER, CUT, (200, None)},
        headers=b"".join(b"X-H%d: v\r\n" % i for i in range(500)),
    ),
    Case("header-no-colon", "GET", "/v2/", {PARSER, CUT}, headers=b"NoColonHere\r\n"),
    Case(
        "header-obs-fold",
        "GET",
        "/v2/",
        {PARSER, CUT, (200, None)},
        headers=b"X-A: a\r\n folded\r\n",
    ),
    Case(
        "user-agent-huge-platform",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {(200, None), err(404, "MANIFEST_UNKNOWN")},
        headers=MANIFEST_V2_LINE
        + b"User-Agent: os/"
        + b"x" * 4000
        + b" arch/"
        + b"y" * 3000
        + b"\r\n",
        upstream_ok=True,
    ),
    Case(
        "range-cached-letters",
        "GET",
        "{blob}",
        RANGE_REFUSED | {(200, None)},
        headers=b"Range: bytes=abc\r\n",
        needs="blob",
        check=_full_or_refused_range,
    ),
    Case(
        "range-cached-reversed",
        "GET",
        "{blob}",
        RANGE_REFUSED | {(200, None)},
        headers=b"Range: bytes=5-1\r\n",
        needs="blob",
        check=_full_or_refused_range,
    ),
    Case(
        "range-cached-multi",
        "GET",
        "{blob}",
        RANGE_REFUSED | {(200, None), (206, None)},
        headers=b"Range: bytes=0-0,5-6\r\n",
        needs="blob",
        check=_full_or_refused_range,
    ),
    Case(
        "range-cached-beyond",
        "GET",
        "{blob}",
        RANGE_REFUSED,
        headers=b"Range: bytes=99999999999-\r\n",
        needs="blob",
        check=_full_or_refused_range,
    ),
    Case(
        "range-cached-negative",
        "GET",
        "{blob}",
        RANGE_REFUSED | {(200, None)},
        headers=b"Range: bytes=--5\r\n",
        needs="blob",
        check=_full_or_refused_range,
    ),
    Case(
        "range-cached-other-unit",
        "GET",
        "{blob}",
        RANGE_REFUSED | {(200, None)},
        headers=b"Range: items=0-1\r\n",
        needs="blob",
        check=_full_or_refused_range,
    ),
    Case(
        "range-9k",
        "GET",
        "{blob}",
        {PARSER, CUT},
        headers=b"Range: bytes=" + b"1" * 9000 + b"-\r\n",
        needs="blob",
    ),
    Case(
        "range-cold-letters",
        "GET",
        "{cold}",
        RANGE_REFUSED | {(200, None)},
        headers=b"Range: bytes=abc\r\n",
        needs="cold",
        upstream_ok=True,
        check=_full_or_refused_range,
    ),
    Case(
        "range-cold-reversed",
        "GET",
        "{cold}",
        RANGE_REFUSED | {(200, None)},
        headers=b"Range: bytes=5-1\r\n",
        needs="cold",
        upstream_ok=True,
        check=_full_or_refused_range,
    ),
    Case(
        "range-cold-beyond",
        "GET",
        "{cold}",
        RANGE_REFUSED,
        headers=b"Range: bytes=99999999999-\r\n",
        needs="cold",
        upstream_ok=True,
        check=_full_or_refused_range,
    ),
    Case(
        "range-on-manifest",
        "GET",
        "/v2/library/alpine/manifests/3.19",
        {(200, None), (206, None)} | RANGE_REFUSED,
        headers=b"Range: bytes=abc\r\n",
        upstream_ok=True,
    ),
    # -- methods on the wrong routes ----------------------------------------------------------
    *(
        Case(f"{m.lower()}-v2-base", m, "/v2/", {UNSUPPORTED})
        for m in ("POST", "PUT", "DELETE", "PATCH")
    ),
    *(
        Case(f"{m.lower()}-{name}", m, path, {UNSUPPORTED, NOT_FOUND})
        for m in ("POST", "PUT", "DELETE")
        for name, path in (
            ("healthz", "/healthz"),
            ("readyz", "/readyz"),
            ("metrics", "/metrics"),
            ("inspect", "/_regproxy/inspect?image=alpine"),
        )
    ),
    *(
        Case(f"{m.lower()}-{kind}", m, path, {UNSUPPORTED})
        for m in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        for kind, path in (
            ("manifest", "/v2/library/alpine/manifests/3.19"),
            ("blob", f"/v2/library/alpine/blobs/sha256:{Z64}"),
            ("uploads", "/v2/library/alpine/blobs/uploads/"),
            ("tags", "/v2/library/alpine/tags/list"),
        )
    ),
    Case("get-uploads", "GET", "/v2/library/alpine/blobs/uploads/", {NOT_FOUND, UNSUPPORTED}),
    Case(
        "get-uploads-uuid",
        "GET",
        "/v2/library/alpine/blobs/uploads/0f4e6c2a",
        {NOT_FOUND, UNSUPPORTED, DIGEST_INVALID},
    ),
    Case("get-catalog", "GET", "/v2/_catalog", {NOT_FOUND, UNSUPPORTED}),
    Case("get-no-kind", "GET", "/v2/library/alpine", {NOT_FOUND}),
    Case("trace", "TRACE", "/v2/", {NOT_FOUND, UNSUPPORTED}),
    Case("connect", "CONNECT", "example.com:443", {NOT_FOUND, UNSUPPORTED, PARSER, CUT}),
    Case("unknown-method", "FOO", "/v2/", {UNSUPPORTED, PARSER, CUT}),
    Case("lowercase-method", "get", "/v2/", {UNSUPPORTED, PARSER, CUT, (200, None)}),
    Case("asterisk-target", "GET", "*", {PARSER, NOT_FOUND, CUT}),
    Case("absolute-form-other-host", "GET", f"http://{MARK}.example/v2/", {(200, None), NOT_FOUND}),
    Case("double-slash", "GET", "//v2/", {NOT_FOUND, (200, None)}),
    Case(
        "get-with-body",
        "GET",
        "/v2/",
        {(200, None), err(413, "UNKNOWN"), ("raw", 413)},
        headers=b"Content-Length: 4096\r\n",
        body=b"x" * 4096,
    ),
    Case(
        "cl-and-te",
        "GET",
        "/v2/",
        {PARSER, CUT, (200, None)},
        headers=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        body=b"0\r\n\r\n",
    ),
]


def _expand(case: Case, h: Hostile) -> Case:
    if not case.needs:
        return case
    image = h.seeded["library/redis:7"]
    if case.needs == "blob":
        digest = image.child("linux/amd64").layers[0]
        target = f"/v2/library/redis/blobs/{digest}"
    else:
        # one never-requested blob per cold case: the config/layers of other images
        pool = [
            d
            for ref in ("library/busybox:1.36", "library/mysql:5.7", "library/alpine:3.19")
            for child in h.seeded[ref].children.values()
            for d in (child.config_digest, *child.layers)
        ]
        cold = [c.id for c in CASES if c.needs == "cold"]
        digest = pool[cold.index(case.id)]
        repository = next(
            ref.rpartition(":")[0]
            for ref in ("library/busybox:1.36", "library/mysql:5.7", "library/alpine:3.19")
            if digest in h.seeded[ref].blobs
        )
        target = f"/v2/{repository}/blobs/{digest}"
    return Case(**{**case.__dict__, "target": target, "needs": ""})


def _params() -> list[Any]:
    return [
        pytest.param(
            c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else []
        )
        for c in CASES
    ]


@pytest.mark.parametrize("case", _params())
async def test_bad_request_gets_a_registry_error_or_is_refused(
    hostile: Hostile, case: Case
) -> None:
    case = _expand(case, hostile)
    if case.id.startswith("range-cached"):
        assert isinstance(case.target, str)
        warm = await request(f"{hostile.proxy.url}{case.target}")
        assert warm.status == 200
    before = hostile.snapshot()
    upstream_before = hostile.upstream.count()

    resp = await raw_exchange(
        hostile.proxy.port,
        http_request(case.method, case.target, case.headers, case.body),
        method=case.method,
    )
    outcome = resp.outcome()
    assert outcome in case.expect, (case.id, resp)
    assert resp.status != 500
    if resp.status is not None and resp.status >= 400 and resp.json_code is None:
        # Only aiohttp's parser (plain 400, connection closed) and a 416 for a cached blob's
        # range answer without the JSON envelope.
        assert resp.status in (400, 416), resp
    if case.check is not None:
        case.check(resp, hostile)

    up = await request(f"{hostile.proxy.url}/v2/")
    assert up.status == 200, "the server went down"
    if not case.upstream_ok:
        assert hostile.upstream.count() == upstream_before, [
            (r.method, r.path) for r in hostile.upstream.requests[upstream_before:]
        ]
    assert hostile.snapshot() == before, "something was written outside the storage directory"
    for place in (hostile.outer, Path("/tmp"), Path(__file__).resolve().parents[1]):  # noqa: ASYNC240 - a test-side check
        assert not list(place.glob(f"*{MARK}*")), place
    root = hostile.proxy.storage.resolve()
    for path in hostile.proxy.storage.rglob("*"):
        assert MARK not in path.name, path
        assert path.resolve().is_relative_to(root), path


async def test_requests_refused_by_the_http_parser_leave_no_traceback(
    hostile: Hostile,
) -> None:
    """A malformed request is one access-log line, not an error with a stack trace."""
    mark = len(hostile.proxy.logs())
    for data in (
        http_request("GET", f"/v2/library/{MARK}\x00x/manifests/1".encode()),
        http_request("GET", "/v2/" + "a" * 10_000),
        http_request("FOO", "/v2/"),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS ClientHello
        b"GARBAGE\r\n\r\n",
    ):
        resp = await raw_exchange(hostile.proxy.port, data)
        assert resp.outcome() in (PARSER, CUT), resp
    await asyncio.sleep(0.2)
    assert (await request(f"{hostile.proxy.url}/v2/")).status == 200
    new = hostile.proxy.logs()[mark:]
    assert "Traceback" not in new, new[-4000:]


async def test_log_lines_cannot_be_forged_through_the_path(hostile: Hostile) -> None:
    forged = "2030-01-01 00:00:00,000 INFO proxy.access request method=GET path=/forged status=200"
    target = "/v2/library/x%0d%0a" + forged.replace(" ", "%20") + "/manifests/1"
    resp = await raw_exchange(hostile.proxy.port, http_request("GET", target))
    assert resp.outcome() in (NAME_INVALID, NOT_FOUND), resp
    await asyncio.sleep(0.2)
    lines = hostile.proxy.logs().splitlines()
    assert not any(line.startswith("2030-01-01") for line in lines), "a log line was forged"


# -- slow and vanishing clients ------------------------------------------------------------------


async def test_slowloris_clients_do_not_starve_others(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    record_property: Callable[[str, object], None],
) -> None:
    """Clients dripping their headers do not slow others, and are cut off at --head-timeout."""
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=["--head-timeout", "3s"])
    image = seeded_registry["library/alpine:3.19"]
    cached = f"{proxy.url}/v2/library/alpine/manifests/{image.digest}"
    assert (await request(cached)).status == 200

    slow_count, duration = 40, 8.0
    streams = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(slow_count)]
    cut_off: set[int] = set()

    async def drip(i: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            try:
                writer.write(b"a")  # one byte per half second
                await writer.drain()
            except ConnectionError:
                cut_off.add(i)
                return
            await asyncio.sleep(0.5)

    latencies: list[float] = []

    async def others() -> None:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                started = time.monotonic()
                for url in (f"{proxy.url}/v2/", cached):
                    got = await request(url, session=session, within=5)
                    assert got.status == 200, got
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.25)

    await asyncio.gather(others(), *(drip(i, w) for i, (_, w) in enumerate(streams)))
    assert latencies and max(latencies) < 2.0, latencies

    # do the slow ones still get an answer once their headers are complete?
    answered = 0
    for i, (reader, writer) in enumerate(streams):
        if i in cut_off:
            continue
        try:
            writer.write(b"\r\nConnection: close\r\n\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 5)
            if data.startswith(b"HTTP/1.1 200"):
                answered += 1
            elif not data:
                cut_off.add(i)
        except (ConnectionError, TimeoutError):
            cut_off.add(i)
        finally:
            writer.close()
    record_property("slowloris_cut_off", len(cut_off))
    record_property("slowloris_answered", answered)
    print(
        f"slowloris: {len(cut_off)} of {slow_count} cut off, {answered} answered after {duration}s"
    )
    assert answered + len(cut_off) == slow_count
    assert (len(cut_off), answered) == (slow_count, 0), "slow heads must be cut off"
    assert "request head took too long" in proxy.logs()
    assert (await request(f"{proxy.url}/v2/")).status == 200


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _vanish(port: int, target: str, read_bytes: int, *, reset: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(http_request("GET", target))
    await writer.drain()
    got = 0
    try:
        while got < read_bytes:
            chunk = await asyncio.wait_for(reader.read(min(65536, read_bytes - got)), 10)
            if not chunk:
                break
            got += len(chunk)
    finally:
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()


async def test_clients_vanishing_mid_transfer_leave_the_server_whole(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(
        registry, "library/vanish", "1", platforms=("linux/amd64",), layer_sizes=(4 * MiB,)
    )
    child = image.child("linux/amd64")
    layer, data = child.layers[0], image.blobs[child.layers[0]]
    upstream = front(registry)
    upstream.add_fault(blob(layer, "GET"), Drip(2 * MiB))
    proxy = proxy_factory(upstream.url)
    assert proxy.pid is not None
    url = f"/v2/library/vanish/blobs/{layer}"
    baseline = _fd_count(proxy.pid)

    async def stuck_reader() -> None:
        # reads the headers, then nothing for 3 s: must not hold up anyone else
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(http_request("GET", url))
        await writer.drain()
        await reader.read(1024)
        await asyncio.sleep(3)
        writer.close()

    vanishers = [
        _vanish(proxy.port, url, n, reset=i % 2 == 0)
        for i, n in enumerate([0] * 15 + [1] * 15 + [64 * 1024] * 15 + [2 * MiB] * 15)
    ]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        results = await asyncio.gather(
            *vanishers,
            *(stuck_reader() for _ in range(5)),
            *(request(f"{proxy.url}{url}", session=session) for _ in range(5)),
            return_exceptions=True,
        )
    for got in results:
        assert not isinstance(got, BaseException) or isinstance(got, ConnectionError), got
    for got in results[-5:]:
        assert isinstance(got, Outcome) and (got.status, got.error, got.body) == (
            200,
            None,
            data,
        ), got
    assert upstream.count("GET", f"/blobs/{layer}") == 1

    # now the cached path (sendfile): 40 more vanish mid-way
    await asyncio.gather(
        *(_vanish(proxy.port, url, 512 * 1024, reset=i % 2 == 0) for i in range(40))
    )
    assert (await request(f"{proxy.url}/v2/")).status == 200
    assert stored_blobs_verify(proxy.storage) == {layer: len(data)}
    assert await eventually(lambda: _fd_count(proxy.pid or 0) <= baseline + 8, within=10), (
        baseline,
        _fd_count(proxy.pid),
    )
    assert " status=500 " not in "\n".join(
        line for line in proxy.logs().splitlines() if "cache=HIT" in line
    ), "the cached path (sendfile) logged a 500 for a vanished client"


async def test_vanishing_clients_are_not_logged_as_server_errors(
    registry: Registry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seed_image(
        registry, "library/gone", "1", platforms=("linux/amd64",), layer_sizes=(2 * MiB,)
    )
    layer = image.child("linux/amd64").layers[0]
    upstream = front(registry)
    upstream.add_fault(blob(layer, "GET"), Drip(1 * MiB))
    proxy = proxy_factory(upstream.url)
    url = f"/v2/library/gone/blobs/{layer}"
    await asyncio.gather(
        *(
            _vanish(proxy.port, url, n, reset=i % 2 == 0)
            for i, n in enumerate([0] * 10 + [64 * 1024] * 10)
        )
    )
    got = await request(f"{proxy.url}{url}")
    assert (got.status, got.body) == (200, image.blobs[layer])
    logs = proxy.logs()
    assert "Traceback" not in logs, logs[-3000:]
    assert " status=500 " not in logs


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of loopback TCP sockets."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, theirs


@pytest.mark.served_loop
@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_sendfile_sends_every_byte_to_a_slow_reader(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """sendfile_to_transport on the server's loop: the headers the transport holds go first,
    then the file from an offset, waiting for writability when the socket is full (uvloop
    refuses add_writer on a fd its transport owns: the wait is on a duplicate). Over TCP the
    socket holds at most NOTSENT_LOWAT unsent bytes, and is writable only below that."""
    loop = asyncio.get_running_loop()
    if "[uvloop]" in request.node.name:
        assert type(loop).__module__.startswith("uvloop"), type(loop)
    ours, theirs = socket.socketpair() if kind == "unix" else tcp_pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    theirs.setblocking(False)
    if kind == "unix":
        transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=ours)
    else:
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    data = os.urandom(4 * MiB)
    blob_path = tmp_path / "blob"
    blob_path.write_bytes(data)
    fd = os.open(blob_path, os.O_RDONLY)
    received = bytearray()
    lowat = 0

    async def read_slowly() -> None:
        while len(received) < 5 + len(data) - 1000:
            chunk = await loop.sock_recv(theirs, 64 * 1024)
            if not chunk:
                return
            received.extend(chunk)
            await asyncio.sleep(0.001)

    try:
        transport.write(b"HEAD:")
        reader = asyncio.create_task(read_slowly())
        sent = await asyncio.wait_for(
            sendfile_to_transport(transport, fd, 1000, len(data) - 1000), 30
        )
        if kind == "tcp":
            lowat = ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        await asyncio.wait_for(reader, 30)
    finally:
        os.close(fd)
        transport.close()
        theirs.close()
    assert sent == len(data) - 1000
    assert bytes(received) == b"HEAD:" + data[1000:]
    if kind == "tcp":
        assert lowat == NOTSENT_LOWAT


@pytest.mark.served_loop
async def test_sendfile_to_a_client_that_left_says_the_client_left(tmp_path: Path) -> None:
    """EPIPE from sendfile (the client closed before the bytes went out) is the same
    ConnectionResetError as a reset: what the blob answer takes for "client gone" rather than
    a server error with a traceback (seen once in CI under load, in the test above)."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=ours)
    theirs.close()
    blob_path = tmp_path / "blob"
    blob_path.write_bytes(os.urandom(MiB))
    fd = os.open(blob_path, os.O_RDONLY)
    try:
        with pytest.raises(ConnectionResetError):
            await sendfile_to_transport(transport, fd, 0, MiB)
    finally:
        os.close(fd)
        transport.close()


# -- a misbehaving upstream -------------------------------------------------------------------


def _bad_documents(good: bytes) -> dict[str, tuple[dict[str, str], bytes, bool]]:
    """name -> (headers, body, also_for_head)."""
    doc = json.loads(good)
    big = dict(doc, annotations={"pad": "x" * (4 * MiB + 10)})
    return {
        "invalid-json": ({"Content-Type": OCI_MANIFEST}, good[: len(good) // 2], True),
        "json-array": ({"Content-Type": OCI_MANIFEST}, b'["schemaVersion", 2]', True),
        "html-page": ({"Content-Type": "text/html"}, b"<html><body>Welcome</body></html>", True),
        "media-type-contradicts-content-type": ({"Content-Type": DOCKER_MANIFEST}, good, True),
        "over-4-MiB": ({"Content-Type": OCI_MANIFEST}, json.dumps(big).encode(), True),
        "bytes-do-not-match-digest": (
            {"Content-Type": OCI_MANIFEST},
            good.replace(b"{", b"{ ", 1),
            False,
        ),
    }


BAD_DOCUMENT_NAMES = sorted(_bad_documents(b'{"mediaType": "x"}'))


@pytest.mark.parametrize(
    "kind",
    [k for k in BAD_DOCUMENT_NAMES],
)
async def test_malformed_manifest_from_upstream_is_an_error_and_not_cached(
    seeded_registry: SeededRegistry, front: FrontFactory, proxy_factory: ProxyFactory, kind: str
) -> None:
    image = seeded_registry["library/hello:latest"]  # a single OCI manifest
    assert image.media_type == OCI_MANIFEST
    headers, body, for_head = _bad_documents(image.raw)[kind]
    headers = {**headers, "Docker-Content-Digest": image.digest if not for_head else sha256(body)}
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url)
    where = path_contains("/library/hello/manifests/")
    if for_head:
        upstream.add_fault(where, Status(200, headers, body), times=1000)
    else:
        upstream.add_fault(all_of(where, method_is("GET")), Status(200, headers, body), times=1000)
    base = f"{proxy.url}/v2/library/hello/manifests"

    got = await request(f"{base}/latest")
    assert got.status == 503, got
    assert got.registry_error() == "UNAVAILABLE"
    # by digest: the bogus document's own (HEAD-announced) digest, or the real one whose bytes
    # come back altered
    got = await request(f"{base}/{sha256(body) if for_head else image.digest}")
    assert got.status in (503, 404), got
    got.registry_error()
    assert not manifest_file(proxy, sha256(body)).exists()
    assert not list((proxy.storage / "manifests").rglob("*")), "a bad manifest was stored"
    assert "Traceback" not in proxy.logs()
    assert (await request(f"{proxy.url}/v2/")).status == 200

    # a later correct answer is fetched afresh, for HEAD and GET alike
    upstream.clear_faults()
    head = await request(f"{base}/latest", "HEAD")
    assert head.headers is not None, head
    assert (head.status, head.headers["Docker-Content-Digest"]) == (200, image.digest), head
    fresh = await request(f"{base}/latest")
    assert (fresh.status, fresh.body) == (200, image.raw), fresh


async def test_index_pointing_at_missing_children_gives_clear_errors(
    seeded_registry: SeededRegistry, front: FrontFactory, proxy_factory: ProxyFactory
) -> None:
    image = seeded_registry["library/alpine:3.19"]
    missing = [sha256(os.urandom(16)) for _ in range(2)]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": 1234,
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for digest, arch in zip(missing, ("amd64", "arm64"), strict=True)
            ],
        }
    ).encode()
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=["--tag-ttl", "0s"])
    upstream.add_fault(
        lambda r: r.path.endswith(("/library/alpine/manifests/3.19", sha256(index))),
        Status(200, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": sha256(index)}, index),
        times=1000,
    )
    base = f"{proxy.url}/v2/library/alpine/manifests"

    got = await request(f"{base}/3.19")
    assert (got.status, got.body) == (200, index), got  # well-formed: passed through as is
    for digest in missing:
        got = await request(f"{base}/{digest}")
        assert got.status == 404 and got.registry_error() == "MANIFEST_UNKNOWN", got
        assert not manifest_file(proxy, digest).exists()
    # a client that cannot take an index asks for its platform's (missing) child
    got = await request(f"{base}/3.19", headers={"Accept": OCI_MANIFEST})
    assert got.status == 404 and got.registry_error() == "MANIFEST_UNKNOWN", got
    assert "Traceback" not in proxy.logs()

    upstream.clear_faults()
    fresh = await request(f"{base}/3.19")
    assert (fresh.status, fresh.body) == (200, image.raw), fresh


# -- credentials ---------------------------------------------------------------------------------


def _secret_forms(user: str, password: str) -> list[bytes]:
    forms = {password.encode()}
    for raw in (f"{user}:{password}".encode(), password.encode()):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(raw)
            forms.add(text)
            forms.add(text.rstrip(b"="))
    return sorted(forms)


@pytest.mark.parametrize("source", ["environment", "password-file"])
async def test_upstream_credentials_never_leak(
    token_registry: Any,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    source: str,
) -> None:
    user, password = token_registry.creds
    image = token_registry.image
    child = next(iter(image.children.values()))
    upstream = front(token_registry.registry)
    cdn = front(token_registry.registry)
    if source == "environment":
        auth: dict[str, Any] = {"env": {"REGPROXY_UPSTREAM_PASSWORD": password}, "extra_args": []}
    else:
        secret_file = tmp_path / "secret"
        secret_file.write_text(password + "\n")
        auth = {"env": {}, "extra_args": ["--upstream-password-file", str(secret_file)]}
    proxy = proxy_factory(
        upstream.url,
        extra_args=["--upstream-username", user, "--log-level", "debug", *auth["extra_args"]],
        env=auth["env"],
    )
    base = f"{proxy.url}/v2/library/alpine"
    seen: list[bytes] = []

    async def hit(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Outcome:
        got = await request(url, method, headers)
        seen.append(got.body)
        if got.headers is not None:
            seen.append("\n".join(f"{k}: {v}" for k, v in got.headers.items()).encode())
        return got

    assert (await hit(f"{base}/manifests/3.19")).status == 200
    assert (await hit(f"{base}/manifests/{child.digest}")).status == 200
    for digest in (child.config_digest, *child.layers):
        assert (await hit(f"{base}/blobs/{digest}")).status == 200
    # failing pulls, each a different path through the upstream client
    await hit(f"{base}/manifests/no-such-tag")
    await hit(f"{proxy.url}/v2/library/nothere/manifests/1")
    await hit(f"{base}/blobs/sha256:{Z64}")
    await hit(f"{base}/tags/list")
    await hit(f"{proxy.url}/_regproxy/inspect?image=alpine:3.19")
    await hit(f"{base}/manifests/3.19", headers={"Authorization": "Basic bWFsbG9yeTpzZWNyZXQ="})
    upstream.add_fault(path_contains("/blobs/", "GET"), RedirectTo(cdn), times=5)
    await hit(f"{base}/blobs/{sha256(b'x')}")
    upstream.clear_faults()
    upstream.add_fault(
        any_request,
        Status(
            401,
            {
                "WWW-Authenticate": f'Bearer realm="{token_registry.issuer.realm}",'
                'service="registry.test",scope="repository:library/other:pull"'
            },
        ),
        times=3,
    )
    await hit(f"{proxy.url}/v2/library/other/manifests/1")
    upstream.clear_faults()
    upstream.add_fault(any_request, Status(503), times=20)
    await hit(f"{proxy.url}/v2/library/gone/manifests/1")
    upstream.clear_faults()
    upstream.add_fault(any_request, too_many_requests(1), times=1)
    await hit(f"{proxy.url}/v2/library/limited/manifests/1")
    await asyncio.sleep(1.1)
    for path in ("/metrics", "/readyz", "/healthz", "/v2/"):
        await hit(f"{proxy.url}{path}")

    tokens = {
        r.headers["Authorization"].split(" ", 1)[1].encode()
        for r in upstream.requests
        if r.headers.get("Authorization", "").startswith("Bearer ")
    }
    assert tokens, "the test meant to exercise the Bearer flow"
    assert token_registry.issuer.count(username=user) >= 1, "the login was not used"
    assert not cdn.saw_authorization
    log = proxy.logs().encode()
    cmdline = Path(f"/proc/{proxy.pid}/cmdline").read_bytes()  # noqa: ASYNC240
    for secret in [*_secret_forms(user, password), *tokens]:
        assert secret not in log, f"{secret[:12]!r}... is in the proxy log"
        assert secret not in cmdline
        for body in seen:
            assert secret not in body, f"{secret[:12]!r}... is in a response"


def test_credentials_in_a_bad_configuration_are_not_echoed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.harness.proxyproc import REPO_ROOT

    password = "s3cr3t-" + os.urandom(6).hex()
    runs = [
        (["--upstream", f"http://bob:{password}@127.0.0.1:1"], {}),
        (["--upstream", "http://127.0.0.1:1"], {"REGPROXY_UPSTREAM_PASSWORD": password}),
    ]
    for args, env in runs:
        proc = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--storage", str(tmp_path / "s"), *args],
            capture_output=True,
            cwd=REPO_ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)},
            timeout=30,
            check=False,
        )
        assert proc.returncode != 0, proc
        output = proc.stdout + proc.stderr
        assert output.strip(), "a bad configuration must say what is wrong"
        for secret in _secret_forms("bob", password):
            assert secret not in output, output
