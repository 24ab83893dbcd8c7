"""The upstream registries regproxy pulls from: their settings (``upstreams:`` and the
single-upstream shorthand ``upstream:``), owned by the fetch layer that uses them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxy.core.settings import (
    ConfigError,
    check_keys,
    field_of,
    parse_bool,
    parse_duration,
    parse_url,
    read_secret,
    section_of,
)

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
#: Hosts that name Docker Hub in containerd's ``?ns=`` and in image references.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class UpstreamConfig:
    """One registry regproxy pulls from."""

    #: The name clients route by (``?ns=`` host or path prefix); also the storage namespace.
    name: str
    #: Base URL, e.g. ``https://registry-1.docker.io``.
    url: str
    #: Username for Basic auth or the token service; anonymous when unset.
    username: str | None = None
    #: Password or token; from a file or the environment, never a flag. Not shown in repr.
    password: str | None = field(default=None, repr=False)
    #: How long a tag -> digest answer is trusted before revalidating with HEAD; defaults to the
    #: global ``tag_ttl``.
    tag_ttl: float = 300.0
    #: Connections to this upstream at most; defaults to 32.
    max_connections: int = 32
    #: Seconds to wait for a connection; defaults to 10.
    connect_timeout: float = 10.0
    #: Seconds without a byte from upstream before a read fails; defaults to 60. (No total
    #: timeout: blobs can be gigabytes.)
    read_timeout: float = 60.0
    #: Whether ``alpine`` means ``library/alpine`` (Docker Hub's convention); defaults to true for
    #: the Docker Hub upstream only.
    library_prefix: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


UPSTREAM_KEYS = frozenset(
    {
        "url",
        "username",
        "password",
        "password_file",
        "tag_ttl",
        "max_connections",
        "library_prefix",
        "connect_timeout",
        "read_timeout",
    }
)


def parse_upstreams(
    raw: Mapping[str, Any], tag_ttl: float
) -> tuple[dict[str, UpstreamConfig], str]:
    sections = dict(section_of(raw.get("upstreams"), "upstreams"))
    default = str(raw.get("default_upstream") or DOCKER_HUB)
    if not sections:
        if default != DOCKER_HUB:
            raise ConfigError("default_upstream", f"{default!r} is not one of the upstreams")
        sections = {DOCKER_HUB: {"url": DOCKER_HUB_URL}}
    # The single-upstream shorthand: --upstream / upstream: / upstream_username / password.
    shorthand = {
        "url": raw.get("upstream"),
        "username": raw.get("upstream_username"),
        "password": raw.get("upstream_password"),
        "password_file": raw.get("upstream_password_file"),
    }
    if any(v not in (None, "") for v in shorthand.values()):
        target = dict(section_of(sections.get(default), f"upstreams.{default}"))
        for key, value in shorthand.items():
            if value not in (None, ""):
                target[key] = value
        sections[default] = target
    if default not in sections:
        raise ConfigError("default_upstream", f"{default!r} is not one of the upstreams")
    result = {}
    for name, section in sections.items():
        result[str(name)] = parse_upstream(str(name), section, tag_ttl)
    return result, default


def parse_upstream(name: str, section: object, tag_ttl: float) -> UpstreamConfig:
    prefix = f"upstreams.{name}."
    if isinstance(section, str):
        section = {"url": section}
    section = section_of(section, prefix.rstrip("."))
    check_keys(section, UPSTREAM_KEYS, prefix)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:_-]*", name):
        raise ConfigError(prefix.rstrip("."), "an upstream name is a host name or a simple word")
    if not section.get("url"):
        raise ConfigError(prefix + "url", "is required")
    url = field_of(section, "url", parse_url, prefix)
    password = section.get("password")
    if section.get("password_file"):
        password = read_secret(section["password_file"], prefix + "password_file")
    kwargs: dict[str, Any] = {
        "name": name,
        "url": url,
        "username": str(section["username"]) if section.get("username") else None,
        "password": str(password) if password else None,
        "tag_ttl": field_of(section, "tag_ttl", parse_duration, prefix)
        if "tag_ttl" in section
        else tag_ttl,
        "library_prefix": name in DOCKER_HUB_ALIASES or urlsplit(url).netloc in DOCKER_HUB_ALIASES,
    }
    if "library_prefix" in section:
        kwargs["library_prefix"] = field_of(section, "library_prefix", parse_bool, prefix)
    for timeout in ("connect_timeout", "read_timeout"):
        if timeout in section:
            value = field_of(section, timeout, parse_duration, prefix)
            if value <= 0:
                raise ConfigError(prefix + timeout, "must be positive")
            kwargs[timeout] = value
    if "max_connections" in section:
        value = field_of(section, "max_connections", int, prefix)
        if value < 1:
            raise ConfigError(prefix + "max_connections", "must be at least 1")
        kwargs["max_connections"] = value
    if kwargs["password"] and not kwargs["username"]:
        raise ConfigError(prefix + "username", "a password needs a username")
    return UpstreamConfig(**kwargs)
