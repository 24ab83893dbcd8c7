"""Typed configuration: defaults < YAML file < ``REGPROXY_*`` environment < command-line flags.

Every scalar setting has a dotted path in the YAML file (``cache.max_size``), an environment
variable named after that path (``REGPROXY_CACHE_MAX_SIZE``; the flag's name works too:
``REGPROXY_MAX_SIZE``) and usually a flag (``--max-size``). A bad value stops start-up with a
:class:`ConfigError` that names the key; secrets never appear in its message.

``upstream: URL`` (``--upstream``) is the shorthand for one default upstream called ``docker.io``,
the registry a Docker daemon's ``registry-mirrors`` stands in for.

This module is the loader only: it merges the layers and hands each section to the feature that
owns it (``upstreams:`` to :mod:`proxy.fetch.settings`, ``auth:`` to :mod:`proxy.access.auth`,
``platforms:`` to :mod:`proxy.platforms.rules`, ``console:`` and ``sync:`` to
:mod:`proxy.ops.settings`); what is left here is the process's own settings (listen address,
TLS, log level) and the storage sections, whose types live in :mod:`storage.settings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.access.auth import AuthConfig, load_auth
from proxy.core.settings import (
    ConfigError,
    check_keys,
    field_of,
    parse_advertise_url,
    parse_bool,
    parse_duration,
    parse_listen,
    parse_log_level,
    parse_size,
    parse_url,
    parse_workers,
    read_secret,
    section_of,
)
from proxy.fetch.settings import DOCKER_HUB, UpstreamConfig, parse_upstreams
from proxy.ops.settings import ConsoleConfig, SyncConfig, parse_console, parse_sync
from proxy.platforms.rules import PlatformsConfig, load_platforms
from proxy.trust.settings import TrustSettings
from proxy.trust.settings import parse as parse_policy
from storage.redis import parse_redis_url
from storage.settings import CacheSettings, S3Settings, WorkSettings

__all__ = ["Config", "ConfigError", "build_config", "load_config"]

# -- the typed configuration -------------------------------------------------------------------


#: Bounds of the cache (typed in ``storage.settings``, loaded here).
CacheConfig = CacheSettings


@dataclass(frozen=True)
class Config:
    """Everything ``regproxy serve`` needs."""

    #: ``HOST:PORT`` to listen on; defaults to ``0.0.0.0:5000``.
    listen: str = "0.0.0.0:5000"
    #: The cache directory; defaults to ``./regproxy-data`` (unused with ``s3``).
    storage: Path = Path("./regproxy-data")
    #: The object store, when ``storage`` is ``s3://BUCKET/PREFIX``; defaults to none.
    s3: S3Settings | None = None
    #: This replica's own disk (spools, local read tier) with ``s3``.
    work: WorkSettings = field(default_factory=WorkSettings)
    #: The URL other replicas reach this one at (peer streaming); defaults to the listen
    #: address, or the host name when listening on every interface.
    advertise_url: str | None = None
    #: Default tag TTL in seconds; defaults to 5 minutes.
    tag_ttl: float = 300.0
    #: Worker processes sharing the listen socket and the cache; None (the default): one per
    #: CPU this process may run on (``os.sched_getaffinity``).
    workers: int | None = None
    #: Logging level; defaults to ``info``.
    log_level: str = "info"
    #: Seconds a client has to send a request's head before its connection is closed
    #: (slowloris); defaults to 30.
    head_timeout: float = 30.0
    #: Seconds between SIGTERM and closing the listener, /readyz answering 503 meanwhile
    #: (load balancers stop sending first); defaults to 0.
    drain_delay: float = 0.0
    #: Seconds a stopping replica (SIGTERM) lets its downloads finish before it hands the rest
    #: over to the other replicas (``proxy.fetch.fleet``) and exits; defaults to 20.
    drain_timeout: float = 20.0
    #: Upstreams by name; defaults to Docker Hub as ``docker.io``.
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    #: The upstream for requests that name none; defaults to ``docker.io``.
    default_upstream: str = DOCKER_HUB
    #: Cache bounds.
    cache: CacheConfig = field(default_factory=CacheConfig)
    #: Never contact an upstream; defaults to false.
    offline: bool = False
    #: Redis URL for shared metadata; in-process when unset.
    redis_url: str | None = None
    #: TLS certificate and key files; plain HTTP when unset.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Platform rules and the default platform (``platforms:``).
    platforms: PlatformsConfig = field(default_factory=lambda: load_platforms({}))
    #: Client authentication and authorization (``auth:``); anonymous pulls by default.
    auth: AuthConfig = field(default_factory=lambda: load_auth({}))
    #: The operator's console.
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    #: Scheduled sync (``sync:`` and ``sync_ratelimit_floor``); nothing is synced by default.
    sync: SyncConfig = field(default_factory=SyncConfig)
    #: The trust policy (``policy:``, :mod:`proxy.trust.settings`); none by default.
    policy: TrustSettings = field(default_factory=TrustSettings)

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def upstream(self, name: str | None = None) -> UpstreamConfig:
        return self.upstreams[name or self.default_upstream]


# -- loading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A scalar setting reachable from a flag and the environment."""

    path: str
    flag: str | None = None

    @property
    def env_names(self) -> tuple[str, ...]:
        names = ["REGPROXY_" + self.path.upper().replace(".", "_")]
        if self.flag:
            flag_env = "REGPROXY_" + self.flag.lstrip("-").upper().replace("-", "_")
            if flag_env not in names:
                names.append(flag_env)
        return tuple(names)


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "--listen"),
    Setting("upstream", "--upstream"),
    Setting("storage", "--storage"),
    Setting("tag_ttl", "--tag-ttl"),
    Setting("log_level", "--log-level"),
    Setting("head_timeout", "--head-timeout"),
    Setting("drain_delay", "--drain-delay"),
    Setting("workers", "--workers"),
    Setting("drain_timeout", "--drain-timeout"),
    Setting("upstream_username", "--upstream-username"),
    Setting("upstream_password_file", "--upstream-password-file"),
    Setting("upstream_password"),  # environment or file only: never a flag
    Setting("default_upstream"),
    Setting("cache.max_size", "--max-size"),
    Setting("cache.high_watermark"),
    Setting("cache.low_watermark"),
    Setting("cache.blob_ttl", "--blob-ttl"),
    Setting("offline", "--offline"),
    Setting("redis.url", "--redis"),
    Setting("tls_cert", "--tls-cert"),
    Setting("tls_key", "--tls-key"),
    Setting("auth.token.signing_key_file"),
    Setting("auth.token.signing_key"),  # environment only: never a flag, never in a file
    Setting("auth.token.realm"),
    Setting("work_dir", "--work-dir"),
    Setting("work_max_size", "--work-max-size"),
    Setting("advertise_url", "--advertise-url"),
    Setting("s3.endpoint"),
    Setting("s3.region"),
    Setting("s3.access_key_id"),
    Setting("s3.secret_access_key_file"),
    Setting("s3.path_style"),
    Setting("s3.redirect"),
    Setting("s3.redirect_expiry"),
    Setting("s3.upload_concurrency"),
    Setting("console.sample_every"),
    Setting("console.history"),
    Setting("sync_ratelimit_floor"),
)

TOP_LEVEL_KEYS = frozenset(
    {s.path.split(".")[0] for s in SETTINGS}
    | {"upstreams", "platforms", "auth", "cache", "redis", "s3"}
)
TOP_LEVEL_KEYS |= {"sync", "policy"}
CACHE_KEYS = frozenset({"max_size", "high_watermark", "low_watermark", "pin", "blob_ttl"})
S3_KEYS = frozenset(
    {
        "bucket",
        "prefix",
        "endpoint",
        "region",
        "access_key_id",
        "secret_access_key_file",
        "path_style",
        "redirect",
        "redirect_expiry",
        "part_size",
        "upload_concurrency",
    }
)


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("config", f"{path} is not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of settings")
    return data


def load_config(
    *,
    config_file: Path | str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge the layers and build a validated :class:`Config`.

    ``flags`` maps setting paths (``"cache.max_size"``) to values given on the command line;
    ``None`` values are ignored. The config file may also come from ``REGPROXY_CONFIG``.
    """
    env = os.environ if environ is None else environ
    config_file = config_file or env.get("REGPROXY_CONFIG")
    raw: dict[str, Any] = read_file(Path(config_file)) if config_file else {}
    for setting in SETTINGS:
        for name in setting.env_names:
            if name in env:
                _set_path(raw, setting.path, env[name])
                break
    for path, value in (flags or {}).items():
        if value is not None:
            _set_path(raw, path, value)
    return build_config(raw)


def build_config(raw: Mapping[str, Any]) -> Config:
    """Validate a merged settings tree (the YAML file's shape) into a :class:`Config`."""
    check_keys(raw, TOP_LEVEL_KEYS, "")
    kwargs: dict[str, Any] = {}
    if "listen" in raw:
        field_of(raw, "listen", parse_listen)
        kwargs["listen"] = str(raw["listen"]).strip()
    if "storage" in raw:
        location = str(raw["storage"]).strip()
        if not location:
            raise ConfigError("storage", "must be a directory path or s3://BUCKET/PREFIX")
        if location.startswith("s3://"):
            kwargs["s3"] = _build_s3(location, section_of(raw.get("s3"), "s3"))
        else:
            kwargs["storage"] = Path(location)
    if raw.get("s3") and "s3" not in kwargs:
        raise ConfigError("storage", "set storage: s3://BUCKET/PREFIX to use the s3 section")
    work: dict[str, Any] = {}
    if raw.get("work_dir"):
        work["path"] = Path(str(raw["work_dir"]))
    if raw.get("work_max_size") not in (None, ""):
        work["max_size"] = field_of(raw, "work_max_size", parse_size)
    kwargs["work"] = WorkSettings(**work)
    if raw.get("advertise_url"):
        kwargs["advertise_url"] = field_of(raw, "advertise_url", parse_advertise_url)
    tag_ttl = field_of(raw, "tag_ttl", parse_duration) if "tag_ttl" in raw else 300.0
    kwargs["tag_ttl"] = tag_ttl
    if "log_level" in raw:
        kwargs["log_level"] = field_of(raw, "log_level", parse_log_level)
    if "head_timeout" in raw:
        kwargs["head_timeout"] = field_of(raw, "head_timeout", parse_duration)
        if kwargs["head_timeout"] <= 0:
            raise ConfigError("head_timeout", "must be positive")
    if "drain_delay" in raw:
        kwargs["drain_delay"] = field_of(raw, "drain_delay", parse_duration)
    if raw.get("workers") not in (None, ""):
        kwargs["workers"] = field_of(raw, "workers", parse_workers)
    if "drain_timeout" in raw:
        kwargs["drain_timeout"] = field_of(raw, "drain_timeout", parse_duration)
    if "offline" in raw:
        kwargs["offline"] = field_of(raw, "offline", parse_bool)
    for key in ("tls_cert", "tls_key"):
        if raw.get(key):
            kwargs[key] = Path(str(raw[key]))
    if bool(kwargs.get("tls_cert")) != bool(kwargs.get("tls_key")):
        raise ConfigError(
            "tls_key" if kwargs.get("tls_cert") else "tls_cert", "set both or neither"
        )
    redis = section_of(raw.get("redis"), "redis")
    check_keys(redis, frozenset({"url"}), "redis.")
    if redis.get("url"):
        kwargs["redis_url"] = field_of(redis, "url", parse_redis_url, "redis.")
    kwargs["cache"] = _build_cache(section_of(raw.get("cache"), "cache"))
    upstreams, default = parse_upstreams(raw, tag_ttl)
    kwargs["upstreams"] = upstreams
    kwargs["default_upstream"] = default
    kwargs["platforms"] = load_platforms(section_of(raw.get("platforms"), "platforms"))
    kwargs["auth"] = load_auth(section_of(raw.get("auth"), "auth"))
    kwargs["console"] = parse_console(section_of(raw.get("console"), "console"))
    kwargs["sync"] = parse_sync(raw, upstreams, default, kwargs["platforms"])
    kwargs["policy"] = parse_policy(raw.get("policy"))
    return Config(**kwargs)


def _build_s3(location: str, section: Mapping[str, Any]) -> S3Settings:
    check_keys(section, S3_KEYS, "s3.")
    parts = urlsplit(location)
    bucket = parts.netloc
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError("storage", f"{bucket!r} is not an S3 bucket name (s3://BUCKET/PREFIX)")
    prefix = parts.path.strip("/")
    if section.get("bucket") and str(section["bucket"]) != bucket:
        raise ConfigError("s3.bucket", "differs from the bucket in storage: s3://…")
    if section.get("prefix") not in (None, "") and not prefix:
        prefix = str(section["prefix"]).strip("/")
    kwargs: dict[str, Any] = {"bucket": bucket, "prefix": prefix}
    for key in ("endpoint", "region", "access_key_id"):
        if section.get(key):
            kwargs[key] = str(section[key])
    if kwargs.get("endpoint"):
        kwargs["endpoint"] = field_of(section, "endpoint", parse_url, "s3.")
    if section.get("secret_access_key_file"):
        kwargs["secret_access_key"] = read_secret(
            section["secret_access_key_file"], "s3.secret_access_key_file"
        )
    if bool(kwargs.get("access_key_id")) != bool(kwargs.get("secret_access_key")):
        raise ConfigError("s3.access_key_id", "set it with s3.secret_access_key_file, or neither")
    for key in ("path_style", "redirect"):
        if section.get(key) not in (None, ""):
            kwargs[key] = field_of(section, key, parse_bool, "s3.")
    if section.get("redirect_expiry") not in (None, ""):
        expiry = field_of(section, "redirect_expiry", parse_duration, "s3.")
        if not 1 <= expiry <= 7 * 86400:
            raise ConfigError("s3.redirect_expiry", "must be between 1s and 7 days")
        kwargs["redirect_expiry"] = expiry
    if section.get("part_size") not in (None, ""):
        part = field_of(section, "part_size", parse_size, "s3.")
        if not 5 * 1024 * 1024 <= part <= 5 * 1024**3:
            raise ConfigError("s3.part_size", "must be between 5 MiB and 5 GiB")
        kwargs["part_size"] = part
    if section.get("upload_concurrency") not in (None, ""):
        count = field_of(section, "upload_concurrency", int, "s3.")
        if not 1 <= count <= 64:
            raise ConfigError("s3.upload_concurrency", "must be between 1 and 64")
        kwargs["upload_concurrency"] = count
    return S3Settings(**kwargs)


def _build_cache(section: Mapping[str, Any]) -> CacheConfig:
    check_keys(section, CACHE_KEYS, "cache.")
    kwargs: dict[str, Any] = {}
    if section.get("max_size") not in (None, ""):
        kwargs["max_size"] = field_of(section, "max_size", parse_size, "cache.")
    for key in ("high_watermark", "low_watermark"):
        if key in section:
            value = field_of(section, key, float, "cache.")
            if not 0 < value <= 1:
                raise ConfigError(f"cache.{key}", "must be a fraction between 0 and 1")
            kwargs[key] = value
    if kwargs.get("low_watermark", 0.85) > kwargs.get("high_watermark", 0.95):
        raise ConfigError("cache.low_watermark", "must not exceed cache.high_watermark")
    if section.get("blob_ttl") not in (None, ""):
        kwargs["blob_ttl"] = field_of(section, "blob_ttl", parse_duration, "cache.")
    pins = section.get("pin") or ()
    if isinstance(pins, str):
        pins = [pins]
    if not isinstance(pins, list | tuple) or not all(isinstance(p, str) for p in pins):
        raise ConfigError("cache.pin", "must be a list of image globs")
    kwargs["pin"] = tuple(pins)
    return CacheConfig(**kwargs)
