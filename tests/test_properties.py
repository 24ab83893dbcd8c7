"""Property-based tests (issue #6): the reference grammar, digests, platforms, ``Accept`` parsing,
and a bounded fuzzing run of the running proxy's request handling.

``test_reference`` already checks that generated names pass and that an accepted name is a safe
path; here each validator is compared with an independent reading of the grammar, the parsers are
shown never to raise anything but their documented error, and normalizations are idempotent.

The fuzzing run sends ~200 random requests (paths in every encoding, methods, headers) to a real
proxy subprocess and checks every answer is a success or a well-formed registry error (a plain
``400`` from the HTTP parser and a bare ``416`` for a cached blob's range are the only answers
without the JSON envelope), never a 500, and that the server stays up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import string
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.core.errors import (
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    RegistryError,
)
from proxy.core.reference import (
    Reference,
    check_digest,
    check_name,
    check_reference,
    check_tag,
    digest_of,
    hasher,
    is_digest,
    parse_image,
)
from proxy.platforms.rules import Platform, accepts_index
from tests.harness.front import Front
from tests.harness.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SeededRegistry,
)
from tests.harness.proxyproc import ProxyProcess

#: Hypothesis' report hook imports mypy_extensions on a failure, which warns; with
#: ``filterwarnings = error`` that would turn a readable failure into an INTERNALERROR.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

#: No example database in the work tree; deadlines off (real I/O in the fuzz test).
PROPS = settings(max_examples=200, deadline=None, database=None)

# -- independent readings of the grammar (distribution's reference/regexp.go) -------------------

SPEC_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
SPEC_NAME = re.compile(rf"{SPEC_COMPONENT}(?:/{SPEC_COMPONENT})*", re.ASCII)
SPEC_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
HEX_LENGTHS = {"sha256": 64, "sha512": 128}

component = st.from_regex(r"[a-z0-9]{1,6}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,6}){0,2}", fullmatch=True)
names = st.lists(component, min_size=1, max_size=5).map("/".join).filter(lambda n: len(n) <= 255)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}", fullmatch=True)
digests = st.one_of(
    st.binary(max_size=64).map(lambda b: digest_of(b)),
    st.binary(max_size=64).map(lambda b: digest_of(b, "sha512")),
)
#: Text that looks like the grammar's alphabet, plus its near misses.
grammarish = st.text(
    alphabet=string.ascii_letters + string.digits + "._-/:@%\\ \x00\u2024\uff0e\u0131",
    max_size=80,
)


@PROPS
@given(st.one_of(grammarish, st.text(max_size=80), names))
def test_check_name_is_exactly_the_grammar(text: str) -> None:
    expected = len(text) <= 255 and SPEC_NAME.fullmatch(text) is not None
    try:
        assert check_name(text) == text
    except NameInvalid:
        assert not expected, text
    else:
        assert expected, text
        assert text == text.lower() and text.isascii()


@PROPS
@given(st.integers(200, 320), st.sampled_from(["a", "ab", "a-b", "a.b", "a__b"]))
def test_name_length_bound(length: int, part: str) -> None:
    name = "/".join([part] * length)[:length].rstrip("/.-_")
    assume(SPEC_NAME.fullmatch(name))
    if len(name) > 255:
        with pytest.raises(NameInvalid):
            check_name(name)
    else:
        assert check_name(name) == name


@PROPS
@given(st.one_of(grammarish, st.text(max_size=140), tags, st.text(min_size=120, max_size=140)))
def test_check_tag_is_exactly_the_grammar(text: str) -> None:
    expected = SPEC_TAG.fullmatch(text) is not None
    try:
        assert check_tag(text) == text
    except ManifestInvalid:
        assert not expected, text
    else:
        assert expected, text
        assert text not in (".", "..") and "/" not in text and len(text) <= 128


@PROPS
@given(
    st.one_of(
        digests,
        grammarish,
        st.builds(
            lambda alg, hexpart: f"{alg}:{hexpart}",
            st.sampled_from(["sha256", "sha512", "SHA256", "sha384", "md5", "", "sha256+b64"]),
            st.text(alphabet="0123456789abcdefABCDEFg", min_size=0, max_size=130),
        ),
    )
)
def test_check_digest_accepts_only_verifiable_digests(text: str) -> None:
    algorithm, sep, hexpart = text.partition(":")
    expected = (
        bool(sep)
        and algorithm in HEX_LENGTHS
        and len(hexpart) == HEX_LENGTHS[algorithm]
        and re.fullmatch(r"[0-9a-f]+", hexpart) is not None
    )
    try:
        assert check_digest(text) == text
    except DigestInvalid:
        assert not expected, text
    else:
        assert expected, text


@PROPS
@given(st.binary(max_size=4096), st.sampled_from(["sha256", "sha512"]))
def test_digest_of_round_trips(data: bytes, algorithm: str) -> None:
    digest = digest_of(data, algorithm)
    assert check_digest(digest) == digest
    assert is_digest(digest)
    h = hasher(digest)
    h.update(data)
    assert f"{algorithm}:{h.hexdigest()}" == digest
    assert digest == f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@PROPS
@given(st.one_of(grammarish, st.text(max_size=200)))
def test_check_reference_raises_only_registry_errors(text: str) -> None:
    with contextlib.suppress(DigestInvalid, ManifestUnknown):
        assert check_reference(text) == text


@PROPS
@given(names, st.none() | tags, st.none() | digests)
def test_parse_image_round_trip(name: str, tag: str | None, digest: str | None) -> None:
    text = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_image(text)
    assert ref == Reference(name, tag, digest)
    assert ref.reference == (digest or tag or "latest")
    if not (tag and digest):
        assert parse_image(str(ref)) == Reference(
            name, tag or ("latest" if not digest else None), digest
        )


@PROPS
@given(st.one_of(grammarish, st.text(max_size=120)))
def test_parse_image_raises_only_registry_errors(text: str) -> None:
    try:
        ref = parse_image(text)
    except RegistryError as exc:
        assert exc.status == 400
        return
    assert check_name(ref.repository) == ref.repository
    if ref.tag is not None:
        check_tag(ref.tag)
    if ref.digest is not None:
        check_digest(ref.digest)


# -- platforms ---------------------------------------------------------------------------------

OSES = ["linux", "windows", "darwin", "freebsd", "unknown"]
ARCHES = [
    "amd64",
    "x86_64",
    "x86-64",
    "arm64",
    "aarch64",
    "arm",
    "armhf",
    "armel",
    "386",
    "i386",
    "i686",
    "ppc64le",
    "s390x",
    "riscv64",
    "mips64le",
    "unknown",
]
VARIANTS = ["", "v5", "v6", "v7", "v8", "v9", "v2", "v3"]
platform_word = st.from_regex(r"[a-z0-9_.-]{1,10}", fullmatch=True)
platform_texts = st.one_of(
    st.builds(
        lambda o, a, v: f"{o}/{a}" + (f"/{v}" if v else ""),
        st.sampled_from(OSES) | platform_word,
        st.sampled_from(ARCHES) | platform_word,
        st.sampled_from(VARIANTS) | platform_word,
    ),
)


@PROPS
@given(platform_texts)
def test_platform_normalization_is_idempotent(text: str) -> None:
    platform = Platform.parse(text)
    assert Platform.parse(str(platform)) == platform
    assert Platform.of(platform.os, platform.architecture, platform.variant) == platform
    assert Platform.from_json(platform.to_json()) == platform
    assert Platform.parse(f"  {text}\n") == platform
    if platform.architecture == "amd64":
        assert platform.variant == ""
    if platform.architecture in ("arm64", "arm"):
        assert platform.variant  # a default variant is always filled in


@PROPS
@given(st.sampled_from(OSES), st.sampled_from(ARCHES), st.sampled_from(VARIANTS))
def test_platform_aliases_agree(os_: str, arch: str, variant: str) -> None:
    canonical = {
        "x86_64": "amd64",
        "x86-64": "amd64",
        "aarch64": "arm64",
        "armhf": "arm",
        "armel": "arm",
        "i386": "386",
        "i686": "386",
    }.get(arch, arch)
    assert Platform.of(os_, arch, variant) == Platform.of(os_, canonical, variant)
    assert Platform.of(os_.upper(), arch.upper(), variant.upper()) == Platform.of(
        os_, arch, variant
    )
    if canonical == "arm64":
        assert Platform.of(os_, arch, "") == Platform.of(os_, arch, "v8")
    if canonical == "arm":
        assert Platform.of(os_, arch, "") == Platform.of(os_, arch, "v7")


@PROPS
@given(st.one_of(grammarish, st.text(max_size=60), platform_texts.map(str.upper)))
def test_platform_parse_raises_only_value_error(text: str) -> None:
    try:
        platform = Platform.parse(text)
    except ValueError:
        return
    assert Platform.parse(str(platform)) == platform


# -- Accept ----------------------------------------------------------------------------------

INDEX_TYPES = [OCI_INDEX, DOCKER_LIST]
SINGLE_TYPES = [OCI_MANIFEST, DOCKER_MANIFEST]
OTHER_TYPES = ["application/json", "text/plain", "application/octet-stream", "image/png"]
params = st.lists(
    st.sampled_from([";q=0.9", ";q=1", "; q=0.5", ";charset=utf-8", ""]), max_size=2
).map("".join)


def media_range(types: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda t, p, upper, pad: (t.upper() if upper else t) + p + pad,
        st.sampled_from(types),
        params,
        st.booleans(),
        st.sampled_from(["", " ", "  "]),
    )


@PROPS
@given(
    st.lists(media_range(SINGLE_TYPES), min_size=0, max_size=3),
    st.lists(media_range(INDEX_TYPES), min_size=1, max_size=2),
    st.lists(media_range(OTHER_TYPES), max_size=2),
    st.randoms(use_true_random=False),
)
def test_an_index_type_anywhere_means_index(
    single: list[str], index: list[str], other: list[str], rnd: object
) -> None:
    items = [*single, *index, *other]
    rnd.shuffle(items)  # type: ignore[attr-defined]
    assert accepts_index(", ".join(items))
    assert accepts_index(",".join(items))


@PROPS
@given(
    st.lists(media_range(SINGLE_TYPES), min_size=1, max_size=3),
    st.lists(media_range(OTHER_TYPES), max_size=2),
    st.randoms(use_true_random=False),
)
def test_only_single_manifest_types_means_no_index(
    single: list[str], other: list[str], rnd: object
) -> None:
    items = [*single, *other]
    rnd.shuffle(items)  # type: ignore[attr-defined]
    header = ", ".join(items)
    assert not accepts_index(header)
    assert accepts_index(header + ", */*")
    assert accepts_index("application/*;q=0.1, " + header)


@PROPS
@given(st.lists(media_range(OTHER_TYPES), max_size=3))
def test_no_manifest_preference_means_index(other: list[str]) -> None:
    assert accepts_index(", ".join(other))


@PROPS
@given(st.text(max_size=300))
def test_accepts_index_never_raises_and_ignores_case(text: str) -> None:
    assert accepts_index(text) == accepts_index(text.upper()) or not text.isascii()


# -- fuzzing the running proxy -------------------------------------------------------------------

REGISTRY_CODES = frozenset(
    {
        "NAME_INVALID",
        "MANIFEST_INVALID",
        "DIGEST_INVALID",
        "RANGE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "NAME_UNKNOWN",
        "MANIFEST_UNKNOWN",
        "BLOB_UNKNOWN",
        "NOT_FOUND",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "UNAVAILABLE",
    }
)
Z64 = "0" * 64
KNOWN_SEGMENTS = [
    "v2",
    "library",
    "alpine",
    "busybox",
    "redis",
    "manifests",
    "blobs",
    "tags",
    "list",
    "uploads",
    "..",
    ".",
    "",
    "3.19",
    "latest",
    "1.36",
    "7",
    f"sha256:{Z64}",
    "_regproxy",
    "inspect",
    "healthz",
    "readyz",
    "metrics",
    "docker.io",
    "ghcr.io",
    "%2e%2e",
    "%2f",
    "%00",
    "%252e",
    "%5c",
    "%ff",
    "%c0%ae",
    "%0d%0a",
]


def _encode(text: str) -> str:
    return quote(text, safe="")


segments = st.one_of(
    st.sampled_from(KNOWN_SEGMENTS),
    st.from_regex(r"[a-z0-9._-]{1,12}", fullmatch=True),
    st.text(max_size=12).map(_encode),
    st.binary(max_size=6).map(lambda b: "".join(f"%{x:02X}" for x in b)),
)
paths = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["/v2/", "/v2/", "/v2/", "/", "/v2", "//", "/_regproxy/"]),
    st.lists(segments, max_size=8),
)
queries = st.one_of(
    st.just(""),
    st.builds(lambda s: f"?ns={s}", segments),
    st.builds(lambda n, last: f"?n={n}&last={last}", st.integers(-5, 10**12), segments),
    st.builds(lambda a, b: f"?image={a}:{b}", segments, segments),
    st.lists(st.tuples(segments, segments), max_size=3).map(
        lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv)
    ),
)
header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "Accept",
                "Range",
                "User-Agent",
                "If-None-Match",
                "If-Modified-Since",
                "Accept-Encoding",
                "Authorization",
                "X-Forwarded-For",
                "Content-Type",
                "Expect",
            ]
        ),
        st.one_of(
            header_value,
            st.sampled_from(
                [
                    OCI_INDEX,
                    DOCKER_MANIFEST,
                    "*/*",
                    "bytes=0-10",
                    "bytes=abc",
                    "bytes=5-1",
                    "bytes=-1",
                    "gzip, br",
                    "Bearer x",
                    "Basic Og==",
                    "100-continue",
                    "docker/24 os/linux arch/arm64",
                ]
            ),
        ),
    ),
    max_size=5,
)
methods = st.sampled_from(
    ["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
)


def _exchange(port: int, data: bytes, timeout: float = 15) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


@pytest.fixture(scope="module")
def fuzz_proxy(
    seeded_registry: SeededRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    upstream = Front(seeded_registry.registry)
    upstream.start()
    root = tmp_path_factory.mktemp("fuzz")
    proxy = ProxyProcess(upstream.url, root / "storage", log_path=root / "proxy.log")
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
        upstream.stop()


def test_fuzzed_requests_get_registry_answers(fuzz_proxy: ProxyProcess) -> None:
    """Every fuzzed request gets a registry answer or aiohttp's own refusal, never a 500; then
    the server is still up with no unhandled error in its log (one test: the health check
    always follows the fuzzing it is about, whatever runs or is selected)."""

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(method=methods, path=paths, query=queries, extra=headers)
    def one(method: str, path: str, query: str, extra: list[tuple[str, str]]) -> None:
        assume(len(path) + len(query) < 4000)
        sent.append(method)
        _check_answer(fuzz_proxy, method, path, query, extra)

    sent: list[str] = []
    one()
    assert len(sent) >= 100, len(sent)
    raw = _exchange(fuzz_proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    log = fuzz_proxy.logs()
    assert "unhandled error" not in log, log[-4000:]
    assert " status=500 " not in log


def _check_answer(
    fuzz_proxy: ProxyProcess, method: str, path: str, query: str, extra: list[tuple[str, str]]
) -> None:
    lines = "".join(f"{name}: {value}\r\n" for name, value in extra)
    data = (
        f"{method} {path}{query} HTTP/1.1\r\nHost: regproxy.test\r\nConnection: close\r\n"
        f"{lines}\r\n"
    ).encode()
    raw = _exchange(fuzz_proxy.port, data)
    assert raw.startswith(b"HTTP/1."), (data, raw[:200])
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    header_lines = head.decode("latin-1").lower().split("\r\n")
    content_type = next(
        (h.split(":", 1)[1].strip() for h in header_lines if h.startswith("content-type:")), ""
    )
    assert status != 500 and status < 600, (data, raw[:400])
    if status >= 400:
        if content_type.startswith("application/json"):
            if method != "HEAD":
                if "transfer-encoding: chunked" in header_lines:
                    body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
                doc = json.loads(body)
                assert doc["errors"][0]["code"] in REGISTRY_CODES, (data, doc)
        else:
            # aiohttp's own answers before the application: the parser's refusal (400), an
            # ``Expect`` it does not know (417); or a cached blob's unsatisfiable range (416)
            assert status in (400, 416, 417), (data, raw[:400])
            if status == 417:
                assert any(name == "Expect" for name, _ in extra)
    assert fuzz_proxy.running
