"""Platform rules (the ``platforms:`` section) and the vocabulary of platforms and index entries.

A :class:`Rule` names a repository/tag glob and the sources (other repositories or upstreams)
whose manifests fill in the platforms upstream's own index lacks; :class:`Platform` parses and
normalizes ``os/arch/variant``. :func:`load_platforms` validates the section and is the one
place its errors come from. Imports only the core layer and the manifest type below it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.cache.manifests import Manifest
from proxy.core.errors import RegistryError
from proxy.core.media import INDEX_TYPES, MANIFEST_TYPES
from proxy.core.reference import parse_image
from proxy.core.settings import ConfigError

ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}
DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}
_PLATFORM_RE = re.compile(r"[a-z0-9_.-]+")


@dataclass(frozen=True, order=True, slots=True)
class Platform:
    """``os/architecture[/variant]``, normalized the way clients match platforms."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def of(cls, os: str, architecture: str, variant: str = "") -> Platform:
        os, architecture, variant = os.lower(), architecture.lower(), variant.lower()
        architecture = ARCH_ALIASES.get(architecture, architecture)
        if architecture == "amd64":
            variant = ""  # amd64 microarchitecture levels do not split images
        variant = variant or DEFAULT_VARIANTS.get(architecture, "")
        return cls(os, architecture, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if not 2 <= len(parts) <= 3 or not all(_PLATFORM_RE.fullmatch(p) for p in parts):
            raise ValueError(f"{text!r} is not a platform such as linux/arm64/v8")
        return cls.of(*parts)

    @classmethod
    def from_json(cls, obj: Any) -> Platform | None:
        """From a descriptor's ``platform`` or an image config (``os``/``architecture``)."""
        if not isinstance(obj, dict) or not obj.get("os") or not obj.get("architecture"):
            return None
        return cls.of(str(obj["os"]), str(obj["architecture"]), str(obj.get("variant") or ""))

    @property
    def unknown(self) -> bool:
        return self.os == "unknown" or self.architecture == "unknown"

    def to_json(self) -> dict[str, str]:
        doc = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            doc["variant"] = self.variant
        return doc

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# -- configuration -----------------------------------------------------------------------------

_TEMPLATE_FIELDS = frozenset({"repository", "tag", "name"})
_GLOB_RE = re.compile(r"[A-Za-z0-9._/*?!\[\]-]+")


def _check_glob(glob: object, key: str) -> str:
    text = str(glob)
    if not _GLOB_RE.fullmatch(text) or text.count("[") != text.count("]"):
        raise ConfigError(key, f"{text!r} is not a valid glob")
    return text


@dataclass(frozen=True)
class Rule:
    """Serve matching tags as an index built from upstream's entries plus ``sources``."""

    repository: str
    tags: tuple[str, ...]
    #: platform -> reference template (``mysql/mysql-server:{tag}``), in the order written.
    sources: tuple[tuple[Platform, str], ...]

    def matches(self, upstream: str, repository: str, tag: str, *, default: bool) -> bool:
        names = (
            (repository, f"{upstream}/{repository}") if default else (f"{upstream}/{repository}",)
        )
        return any(fnmatch.fnmatchcase(n, self.repository) for n in names) and any(
            fnmatch.fnmatchcase(tag, t) for t in self.tags
        )


@dataclass(frozen=True)
class PlatformsConfig:
    #: The platform served to clients that cannot take an index; defaults to linux/amd64.
    default: Platform = Platform("linux", "amd64")
    rules: tuple[Rule, ...] = ()


def render(template: str, repository: str, tag: str) -> str:
    return template.format(repository=repository, tag=tag, name=repository.rsplit("/", 1)[-1])


def load_platforms(section: Mapping[str, Any]) -> PlatformsConfig:
    """Validate the ``platforms:`` section; a bad rule raises ConfigError naming it."""
    unknown = set(section) - {"default", "rules"}
    if unknown:
        raise ConfigError(f"platforms.{sorted(unknown)[0]}", "unknown setting")
    default = PlatformsConfig.default
    if section.get("default"):
        try:
            default = Platform.parse(str(section["default"]))
        except ValueError as exc:
            raise ConfigError("platforms.default", str(exc)) from None
    rules_raw = section.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError("platforms.rules", "must be a list of rules")
    rules = tuple(_load_rule(raw, f"platforms.rules[{i}]") for i, raw in enumerate(rules_raw))
    return PlatformsConfig(default, rules)


def _load_rule(raw: object, key: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a mapping with repository and sources")
    unknown = set(raw) - {"repository", "tags", "sources"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown setting")
    if not raw.get("repository"):
        raise ConfigError(f"{key}.repository", "is required")
    repository = _check_glob(raw["repository"], f"{key}.repository")
    tags_raw = raw.get("tags", ["*"])
    if isinstance(tags_raw, str):
        tags_raw = [tags_raw]
    if not isinstance(tags_raw, list) or not tags_raw:
        raise ConfigError(f"{key}.tags", "must be a list of tag globs")
    tags = tuple(_check_glob(t, f"{key}.tags") for t in tags_raw)
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, Mapping) or not sources_raw:
        raise ConfigError(f"{key}.sources", "must map platforms to image references")
    sources = []
    for platform_text, template in sources_raw.items():
        skey = f"{key}.sources.{platform_text}"
        try:
            platform = Platform.parse(str(platform_text))
        except ValueError as exc:
            raise ConfigError(skey, str(exc)) from None
        template = str(template)
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ConfigError(skey, f"bad template: {exc}") from None
        if not fields <= _TEMPLATE_FIELDS:
            bad = sorted(fields - _TEMPLATE_FIELDS)[0]
            raise ConfigError(
                skey, f"unknown placeholder {{{bad}}}; use {{repository}}, {{tag}}, {{name}}"
            )
        try:
            parse_image(render(template, "library/example", "1.0"))
        except RegistryError:
            raise ConfigError(skey, f"{template!r} does not make an image reference") from None
        sources.append((platform, template))
    return Rule(repository, tags, tuple(sources))


# -- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One child of a served index, with where it came from."""

    descriptor: dict[str, Any]
    #: ``upstream`` or the reference it was synthesized from (``docker.io/mysql/mysql-server:5.7``).
    source: str

    @property
    def platform(self) -> Platform | None:
        return Platform.from_json(self.descriptor.get("platform"))

    def describe(self) -> dict[str, Any]:
        platform = self.platform
        return {
            "platform": str(platform) if platform else "unknown",
            "digest": self.descriptor["digest"],
            "size": self.descriptor.get("size"),
            "media_type": self.descriptor.get("mediaType"),
            "source": self.source,
            "attestation": bool(
                (self.descriptor.get("annotations") or {}).get("vnd.docker.reference.type")
            ),
        }


def index_entries(manifest: Manifest) -> list[Entry]:
    assert manifest.data is not None
    doc = json.loads(manifest.data)
    return [Entry(d, "upstream") for d in doc.get("manifests") or [] if isinstance(d, dict)]


def accepts_index(accept: str) -> bool:
    """False when ``Accept`` names manifest types but no index type (and no wildcard)."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not types & set(MANIFEST_TYPES):
        return True  # no manifest preference stated: the index is the honest answer
    return bool(types & {*INDEX_TYPES, "*/*", "application/*"})


_UA_OS = re.compile(r"\bos/([A-Za-z0-9_]+)")
_UA_ARCH = re.compile(r"\barch/([A-Za-z0-9_]+)")


def platform_from_user_agent(user_agent: str) -> Platform | None:
    os_match, arch_match = _UA_OS.search(user_agent), _UA_ARCH.search(user_agent)
    if not os_match or not arch_match:
        return None
    return Platform.of(os_match.group(1), arch_match.group(1))
