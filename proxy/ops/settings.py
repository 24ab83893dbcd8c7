"""Settings of the operator's features: the console (``console:``) and scheduled sync (``sync:``,
``sync_ratelimit_floor``). A sync entry's repository is routed as a request would be, so this
module reads the routing and platform rules below it."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.access.routing import Router
from proxy.core.errors import RegistryError
from proxy.core.settings import ConfigError, check_keys, field_of, parse_duration
from proxy.fetch.settings import UpstreamConfig
from proxy.platforms.rules import Platform, PlatformsConfig


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator's console (``/_regproxy/``, ``proxy.ops.console``)."""

    #: Seconds between two samples of its history chart; defaults to 30.
    sample_every: float = 30.0
    #: How far back the history chart goes (seconds, kept in memory); defaults to 6 hours.
    history: float = 6 * 3600.0


def parse_console(section: Mapping[str, Any]) -> ConsoleConfig:
    check_keys(section, frozenset({"sample_every", "history"}), "console.")
    kwargs: dict[str, Any] = {}
    for key in ("sample_every", "history"):
        if section.get(key) not in (None, ""):
            kwargs[key] = field_of(section, key, parse_duration, "console.")
            if kwargs[key] <= 0:
                raise ConfigError(f"console.{key}", "must be positive")
    return ConsoleConfig(**kwargs)


# -- scheduled sync (``sync:``) ----------------------------------------------------------------

DEFAULT_SYNC_RATELIMIT_FLOOR = 0.2
#: How often an entry is checked when it gives no ``interval``.
DEFAULT_SYNC_INTERVAL = 600.0
SYNC_ENTRY_KEYS = frozenset({"repository", "tags", "platforms", "interval"})
_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9._*?!\[\]-]{1,128}")


@dataclass(frozen=True)
class SyncEntry:
    """One ``sync:`` entry: tags of one repository kept in the cache ahead of any pull."""

    #: The repository as written (``library/alpine``, ``ghcr.io/org/app``), for messages.
    name: str
    #: The configured upstream it routes to, as a request for ``name`` would.
    upstream: str
    #: The repository name at that upstream, normalized (``library/alpine``).
    repository: str
    #: Globs matched against the upstream's tags/list; defaults to ``["latest"]``.
    tags: tuple[str, ...] = ("latest",)
    #: Platforms fetched (``linux/arm64/v8``); ``None`` means every platform of the index.
    #: Defaults to ``platforms.default``.
    platforms: tuple[str, ...] | None = ("linux/amd64",)
    #: Seconds between checks (jittered by up to 10%); defaults to 10 minutes.
    interval: float = DEFAULT_SYNC_INTERVAL

    @property
    def literal_tags(self) -> bool:
        """True when no glob has a wildcard: the tags are HEADed without listing."""
        return not any(set(t) & set("*?[") for t in self.tags)


@dataclass(frozen=True)
class SyncConfig:
    """The ``sync:`` list and how much of an upstream's rate limit it may use."""

    entries: tuple[SyncEntry, ...] = ()
    #: Sync fetches nothing from an upstream whose ``ratelimit-remaining`` is below this
    #: fraction of its ``ratelimit-limit``; defaults to 0.2 (``sync_ratelimit_floor: 20%``).
    ratelimit_floor_fraction: float | None = DEFAULT_SYNC_RATELIMIT_FLOOR
    #: ... or below this many pulls, when the floor is written as a whole number (``25``).
    ratelimit_floor_count: int | None = None

    def floor(self, limit: int | None) -> float | None:
        """The lowest ``ratelimit-remaining`` at which sync still fetches; None: no floor."""
        if self.ratelimit_floor_count is not None:
            return float(self.ratelimit_floor_count)
        if self.ratelimit_floor_fraction is None or limit is None:
            return None
        return self.ratelimit_floor_fraction * limit


def parse_ratelimit_floor(value: object) -> tuple[float | None, int | None]:
    """``"20%"`` or ``0.2`` -> a fraction of the limit; ``25`` -> an absolute count."""
    if isinstance(value, bool):
        raise ValueError("expected a fraction (0.2), a percentage (20%) or a count (25)")
    text = str(value).strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return percent / 100, None
        if re.fullmatch(r"\d+", text):
            return None, int(text)
        fraction = float(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a fraction (0.2), a percentage (20%) or a count (25)"
        ) from None
    if not 0 <= fraction < 1:
        raise ValueError("a fraction must be at least 0 and below 1; write a count as 25")
    return fraction, None


def _check_tag_glob(glob: object, key: str) -> str:
    text = str(glob).strip() if isinstance(glob, str | int | float) else ""
    if not _TAG_GLOB_RE.fullmatch(text) or text.count("[") != text.count("]"):
        raise ConfigError(key, f"{glob!r} is not a tag glob such as 3.* or latest")
    try:
        re.compile(fnmatch.translate(text))
    except re.error as exc:
        raise ConfigError(key, f"{glob!r} is not a valid glob: {exc}") from None
    return text


def _sync_repository(
    name: str, key: str, upstreams: Mapping[str, UpstreamConfig], default: str
) -> tuple[str, str]:
    """``(upstream, repository)`` for an entry's ``repository``, routed as a request would be.

    A first component with a dot or colon (or ``localhost``) names a registry host, as in image
    references; it must be a configured upstream.
    """
    router = Router(upstreams, default)
    first, sep, rest = name.partition("/")
    try:
        if sep and ("." in first or ":" in first or first == "localhost"):
            upstream = router.lookup(first)
            if upstream is None:
                raise ConfigError(
                    key,
                    f"{name!r}: no upstream is configured for {first!r} "
                    f"(upstreams: {', '.join(sorted(upstreams))})",
                )
            return upstream, router.normalize(upstream, rest)
        return router.route(name, None)
    except RegistryError as exc:
        raise ConfigError(key, f"{name!r}: {exc.message}") from None


def parse_sync(
    raw: Mapping[str, Any],
    upstreams: Mapping[str, UpstreamConfig],
    default: str,
    platforms: PlatformsConfig,
) -> SyncConfig:
    """Validate ``sync:`` and ``sync_ratelimit_floor``; a bad entry raises ConfigError naming it
    (``sync[0].repository``) and, where it has one, its repository."""
    kwargs: dict[str, Any] = {}
    if raw.get("sync_ratelimit_floor") not in (None, ""):
        fraction, count = field_of(raw, "sync_ratelimit_floor", parse_ratelimit_floor)
        kwargs["ratelimit_floor_fraction"], kwargs["ratelimit_floor_count"] = fraction, count
    section = raw.get("sync")
    if section is None:
        section = []
    if not isinstance(section, list):
        raise ConfigError("sync", "must be a list of entries (repository, tags, ...)")
    default_platform = str(platforms.default)
    entries = []
    for i, item in enumerate(section):
        key = f"sync[{i}]"
        try:
            entries.append(parse_sync_entry(item, key, upstreams, default, default_platform))
        except ConfigError as exc:
            name = item.get("repository") if isinstance(item, Mapping) else None
            message = str(exc).removeprefix(f"configuration error: {exc.key}: ")
            if name and str(name) not in message:
                raise ConfigError(exc.key, f"{message} (entry {name})") from None
            raise
    return SyncConfig(entries=tuple(entries), **kwargs)


def parse_sync_entry(
    item: object,
    key: str,
    upstreams: Mapping[str, UpstreamConfig],
    default: str,
    default_platform: str,
) -> SyncEntry:
    if not isinstance(item, Mapping):
        raise ConfigError(key, "must be a mapping with repository, tags, platforms, interval")
    unknown = sorted(set(item) - SYNC_ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", "unknown setting")
    name = str(item.get("repository") or "").strip()
    if not name:
        raise ConfigError(f"{key}.repository", "is required")
    upstream, repository = _sync_repository(name, f"{key}.repository", upstreams, default)
    tags_raw = item.get("tags", ["latest"])
    if isinstance(tags_raw, str):
        tags_raw = [tags_raw]
    if not isinstance(tags_raw, list) or not tags_raw:
        raise ConfigError(f"{key}.tags", "must be a list of tag globs")
    tags = tuple(dict.fromkeys(_check_tag_glob(t, f"{key}.tags") for t in tags_raw))
    chosen: tuple[str, ...] | None = (default_platform,)
    platforms_raw = item.get("platforms")
    if isinstance(platforms_raw, str):
        platforms_raw = None if platforms_raw.strip() == "all" else platforms_raw.split(",")
        if platforms_raw is None:
            chosen = None
    if platforms_raw is not None:
        if not isinstance(platforms_raw, list) or not platforms_raw:
            raise ConfigError(f"{key}.platforms", 'must be "all" or a list of platforms')
        try:
            parsed = (str(Platform.parse(str(p))) for p in platforms_raw)
            chosen = tuple(dict.fromkeys(parsed))
        except ValueError as exc:
            raise ConfigError(f"{key}.platforms", str(exc)) from None
    interval = DEFAULT_SYNC_INTERVAL
    if item.get("interval") not in (None, ""):
        interval = field_of(item, "interval", parse_duration, f"{key}.")
        if interval <= 0:
            raise ConfigError(f"{key}.interval", "must be positive")
    return SyncEntry(name, upstream, repository, tags, chosen, interval)
