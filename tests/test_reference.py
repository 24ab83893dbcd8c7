"""Name, tag and digest grammar (property-based where it pays)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.errors import DigestInvalid, ManifestInvalid, NameInvalid
from proxy.core.reference import NAME_RE, check_digest, check_name, check_tag, parse_image

component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:\.|_|__|-{1,2})[a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(st.lists(component, min_size=1, max_size=4))
def test_valid_names_accepted(parts: list[str]) -> None:
    name = "/".join(parts)
    assert check_name(name) == name


@given(st.text(max_size=80))
def test_any_accepted_name_is_a_safe_path(text: str) -> None:
    try:
        check_name(text)
    except NameInvalid:
        return
    assert NAME_RE.fullmatch(text)
    assert all(part not in ("", ".", "..") for part in text.split("/"))
    assert "\\" not in text and "\x00" not in text


@pytest.mark.parametrize(
    "name",
    ["", "../etc", "a/../b", "A", "a//b", "/a", "a/", "a..b", "%2e%2e", "a\x00b", "a" * 256, "-a"],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        check_name(name)


@pytest.mark.parametrize("tag", ["", ".", "..", "-x", "a/b", "a" * 129, "t\n"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(ManifestInvalid):
        check_tag(tag)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abc",
        "sha256:" + "A" * 64,
        "md5:" + "a" * 32,
        "sha256:" + "a" * 63 + "/",
        "sha512:" + "a" * 64,
        "sha256" + "a" * 64,
        "sha256:" + "a" * 65,
    ],
)
def test_bad_digests(digest: str) -> None:
    with pytest.raises(DigestInvalid):
        check_digest(digest)


def test_good_digests() -> None:
    assert check_digest("sha256:" + "0" * 64)
    assert check_digest("sha512:" + "f" * 128)


@pytest.mark.parametrize(
    ("image", "repository", "tag", "digest"),
    [
        ("library/mysql:5.7", "library/mysql", "5.7", None),
        ("mysql", "mysql", None, None),
        ("ghcr.io/org/app:1", "ghcr.io/org/app", "1", None),
        ("a/b@sha256:" + "1" * 64, "a/b", None, "sha256:" + "1" * 64),
    ],
)
def test_parse_image(image: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_image(image)
    assert (ref.repository, ref.tag, ref.digest) == (repository, tag, digest)
