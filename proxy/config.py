"""Typed configuration: defaults < YAML file < ``REGPROXY_*`` environment < command-line flags.

Every scalar setting has a dotted path in the YAML file (``cache.max_size``), an environment
variable named after that path (``REGPROXY_CACHE_MAX_SIZE``; the flag's name works too:
``REGPROXY_MAX_SIZE``) and usually a flag (``--max-size``). A bad value stops start-up with a
:class:`ConfigError` that names the key; secrets never appear in its message.

``upstream: URL`` (``--upstream``) is the shorthand for one default upstream called ``docker.io``,
the registry a Docker daemon's ``registry-mirrors`` stands in for.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from storage.settings import CacheSettings, S3Settings, WorkSettings

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
#: Hosts that name Docker Hub in containerd's ``?ns=`` and in image references.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration error: {key}: {problem}")
        self.key = key


# -- value parsers -----------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_duration(value: object) -> float:
    """``"5m"``, ``"1h30m"``, ``"90s"``, ``"250ms"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5m, 1h or 30s")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration such as 5m, 1h or 30s")
    return total


def parse_size(value: object) -> int:
    """``"50GiB"``, ``"500MB"``, ``"1.5G"`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GiB or 500MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE_RE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a size such as 50GiB or 500MB")
    number, unit = float(match.group(1)), match.group(2).lower()
    binary = "i" in unit
    letter = unit.rstrip("b").rstrip("i")
    if letter not in _SIZE_UNITS:
        raise ValueError(f"{value!r} has an unknown unit")
    scale = 1024 ** ("kmgtp".index(letter) + 1) if binary and letter else _SIZE_UNITS[letter]
    return int(number * scale)


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def parse_url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL; use username and password_file")
    return text


def parse_listen(value: object) -> tuple[str, int]:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_log_level(value: object) -> str:
    text = str(value).strip().lower()
    if text == "warn":
        text = "warning"
    if text not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return text


# -- the typed configuration -------------------------------------------------------------------


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


#: Bounds of the cache (typed in ``storage.settings``, loaded here).
CacheConfig = CacheSettings


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator's console (``/_regproxy/``, ``proxy.ops.console``)."""

    #: Seconds between two samples of its history chart; defaults to 30.
    sample_every: float = 30.0
    #: How far back the history chart goes (seconds, kept in memory); defaults to 6 hours.
    history: float = 6 * 3600.0


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
    #: Logging level; defaults to ``info``.
    log_level: str = "info"
    #: Seconds a client has to send a request's head before its connection is closed
    #: (slowloris); defaults to 30.
    head_timeout: float = 30.0
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
    #: The ``platforms:`` section as written (validated by ``proxy.platforms``).
    platforms: Mapping[str, Any] = field(default_factory=dict)
    #: The ``auth:`` section as written.
    auth: Mapping[str, Any] = field(default_factory=dict)
    #: The operator's console.
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    #: Scheduled sync (``sync:`` and ``sync_ratelimit_floor``); nothing is synced by default.
    sync: SyncConfig = field(default_factory=lambda: SyncConfig())

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
TOP_LEVEL_KEYS |= {"sync"}
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


def _field(raw: Mapping[str, Any], key: str, parse: Any, prefix: str = "") -> Any:
    try:
        return parse(raw[key])
    except (ValueError, TypeError) as exc:
        raise ConfigError(prefix + key, str(exc)) from None


def _read_secret(path: object, key: str) -> str:
    try:
        return Path(str(path)).read_text().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read the password file: {exc.strerror}") from None


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a mapping")
    return value


def _check_keys(section: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown setting")


def build_config(raw: Mapping[str, Any]) -> Config:
    """Validate a merged settings tree (the YAML file's shape) into a :class:`Config`."""
    _check_keys(raw, TOP_LEVEL_KEYS, "")
    kwargs: dict[str, Any] = {}
    if "listen" in raw:
        _field(raw, "listen", parse_listen)
        kwargs["listen"] = str(raw["listen"]).strip()
    if "storage" in raw:
        location = str(raw["storage"]).strip()
        if not location:
            raise ConfigError("storage", "must be a directory path or s3://BUCKET/PREFIX")
        if location.startswith("s3://"):
            kwargs["s3"] = _build_s3(location, _mapping(raw.get("s3"), "s3"))
        else:
            kwargs["storage"] = Path(location)
    if raw.get("s3") and "s3" not in kwargs:
        raise ConfigError("storage", "set storage: s3://BUCKET/PREFIX to use the s3 section")
    work: dict[str, Any] = {}
    if raw.get("work_dir"):
        work["path"] = Path(str(raw["work_dir"]))
    if raw.get("work_max_size") not in (None, ""):
        work["max_size"] = _field(raw, "work_max_size", parse_size)
    kwargs["work"] = WorkSettings(**work)
    if raw.get("advertise_url"):
        kwargs["advertise_url"] = _field(raw, "advertise_url", parse_url).rstrip("/")
    tag_ttl = _field(raw, "tag_ttl", parse_duration) if "tag_ttl" in raw else 300.0
    kwargs["tag_ttl"] = tag_ttl
    if "log_level" in raw:
        kwargs["log_level"] = _field(raw, "log_level", parse_log_level)
    if "head_timeout" in raw:
        kwargs["head_timeout"] = _field(raw, "head_timeout", parse_duration)
        if kwargs["head_timeout"] <= 0:
            raise ConfigError("head_timeout", "must be positive")
    if "offline" in raw:
        kwargs["offline"] = _field(raw, "offline", parse_bool)
    for key in ("tls_cert", "tls_key"):
        if raw.get(key):
            kwargs[key] = Path(str(raw[key]))
    if bool(kwargs.get("tls_cert")) != bool(kwargs.get("tls_key")):
        raise ConfigError(
            "tls_key" if kwargs.get("tls_cert") else "tls_cert", "set both or neither"
        )
    redis = _mapping(raw.get("redis"), "redis")
    _check_keys(redis, frozenset({"url"}), "redis.")
    if redis.get("url"):
        url = str(redis["url"])
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis.url", "must start with redis://, rediss:// or unix://")
        kwargs["redis_url"] = url
    kwargs["cache"] = _build_cache(_mapping(raw.get("cache"), "cache"))
    upstreams, default = _build_upstreams(raw, tag_ttl)
    kwargs["upstreams"] = upstreams
    kwargs["default_upstream"] = default
    kwargs["platforms"] = _mapping(raw.get("platforms"), "platforms")
    from proxy.platforms.service import load_platforms  # the rules' own module validates them

    load_platforms(kwargs["platforms"])
    kwargs["auth"] = _mapping(raw.get("auth"), "auth")
    from proxy.access.auth import load_auth

    load_auth(kwargs["auth"])
    kwargs["console"] = _build_console(_mapping(raw.get("console"), "console"))
    kwargs["sync"] = _build_sync(raw, upstreams, default, kwargs["platforms"])
    return Config(**kwargs)


def _build_s3(location: str, section: Mapping[str, Any]) -> S3Settings:
    _check_keys(section, S3_KEYS, "s3.")
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
        kwargs["endpoint"] = _field(section, "endpoint", parse_url, "s3.")
    if section.get("secret_access_key_file"):
        kwargs["secret_access_key"] = _read_secret(
            section["secret_access_key_file"], "s3.secret_access_key_file"
        )
    if bool(kwargs.get("access_key_id")) != bool(kwargs.get("secret_access_key")):
        raise ConfigError("s3.access_key_id", "set it with s3.secret_access_key_file, or neither")
    for key in ("path_style", "redirect"):
        if section.get(key) not in (None, ""):
            kwargs[key] = _field(section, key, parse_bool, "s3.")
    if section.get("redirect_expiry") not in (None, ""):
        expiry = _field(section, "redirect_expiry", parse_duration, "s3.")
        if not 1 <= expiry <= 7 * 86400:
            raise ConfigError("s3.redirect_expiry", "must be between 1s and 7 days")
        kwargs["redirect_expiry"] = expiry
    if section.get("part_size") not in (None, ""):
        part = _field(section, "part_size", parse_size, "s3.")
        if not 5 * 1024 * 1024 <= part <= 5 * 1024**3:
            raise ConfigError("s3.part_size", "must be between 5 MiB and 5 GiB")
        kwargs["part_size"] = part
    if section.get("upload_concurrency") not in (None, ""):
        count = _field(section, "upload_concurrency", int, "s3.")
        if not 1 <= count <= 64:
            raise ConfigError("s3.upload_concurrency", "must be between 1 and 64")
        kwargs["upload_concurrency"] = count
    return S3Settings(**kwargs)


def _build_console(section: Mapping[str, Any]) -> ConsoleConfig:
    _check_keys(section, frozenset({"sample_every", "history"}), "console.")
    kwargs: dict[str, Any] = {}
    for key in ("sample_every", "history"):
        if section.get(key) not in (None, ""):
            kwargs[key] = _field(section, key, parse_duration, "console.")
            if kwargs[key] <= 0:
                raise ConfigError(f"console.{key}", "must be positive")
    return ConsoleConfig(**kwargs)


def _build_cache(section: Mapping[str, Any]) -> CacheConfig:
    _check_keys(section, CACHE_KEYS, "cache.")
    kwargs: dict[str, Any] = {}
    if section.get("max_size") not in (None, ""):
        kwargs["max_size"] = _field(section, "max_size", parse_size, "cache.")
    for key in ("high_watermark", "low_watermark"):
        if key in section:
            value = _field(section, key, float, "cache.")
            if not 0 < value <= 1:
                raise ConfigError(f"cache.{key}", "must be a fraction between 0 and 1")
            kwargs[key] = value
    if kwargs.get("low_watermark", 0.85) > kwargs.get("high_watermark", 0.95):
        raise ConfigError("cache.low_watermark", "must not exceed cache.high_watermark")
    if section.get("blob_ttl") not in (None, ""):
        kwargs["blob_ttl"] = _field(section, "blob_ttl", parse_duration, "cache.")
    pins = section.get("pin") or ()
    if isinstance(pins, str):
        pins = [pins]
    if not isinstance(pins, list | tuple) or not all(isinstance(p, str) for p in pins):
        raise ConfigError("cache.pin", "must be a list of image globs")
    kwargs["pin"] = tuple(pins)
    return CacheConfig(**kwargs)


def _build_upstreams(
    raw: Mapping[str, Any], tag_ttl: float
) -> tuple[dict[str, UpstreamConfig], str]:
    sections = dict(_mapping(raw.get("upstreams"), "upstreams"))
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
        target = dict(_mapping(sections.get(default), f"upstreams.{default}"))
        for key, value in shorthand.items():
            if value not in (None, ""):
                target[key] = value
        sections[default] = target
    if default not in sections:
        raise ConfigError("default_upstream", f"{default!r} is not one of the upstreams")
    result = {}
    for name, section in sections.items():
        result[str(name)] = _build_upstream(str(name), section, tag_ttl)
    return result, default


def _build_upstream(name: str, section: object, tag_ttl: float) -> UpstreamConfig:
    prefix = f"upstreams.{name}."
    if isinstance(section, str):
        section = {"url": section}
    section = _mapping(section, prefix.rstrip("."))
    _check_keys(section, UPSTREAM_KEYS, prefix)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:_-]*", name):
        raise ConfigError(prefix.rstrip("."), "an upstream name is a host name or a simple word")
    if not section.get("url"):
        raise ConfigError(prefix + "url", "is required")
    url = _field(section, "url", parse_url, prefix)
    password = section.get("password")
    if section.get("password_file"):
        password = _read_secret(section["password_file"], prefix + "password_file")
    kwargs: dict[str, Any] = {
        "name": name,
        "url": url,
        "username": str(section["username"]) if section.get("username") else None,
        "password": str(password) if password else None,
        "tag_ttl": _field(section, "tag_ttl", parse_duration, prefix)
        if "tag_ttl" in section
        else tag_ttl,
        "library_prefix": name in DOCKER_HUB_ALIASES or urlsplit(url).netloc in DOCKER_HUB_ALIASES,
    }
    if "library_prefix" in section:
        kwargs["library_prefix"] = _field(section, "library_prefix", parse_bool, prefix)
    for timeout in ("connect_timeout", "read_timeout"):
        if timeout in section:
            value = _field(section, timeout, parse_duration, prefix)
            if value <= 0:
                raise ConfigError(prefix + timeout, "must be positive")
            kwargs[timeout] = value
    if "max_connections" in section:
        value = _field(section, "max_connections", int, prefix)
        if value < 1:
            raise ConfigError(prefix + "max_connections", "must be at least 1")
        kwargs["max_connections"] = value
    if kwargs["password"] and not kwargs["username"]:
        raise ConfigError(prefix + "username", "a password needs a username")
    return UpstreamConfig(**kwargs)


# -- scheduled sync (``sync:``) ----------------------------------------------------------------

#: What ``sync_ratelimit_floor`` is when unset: 20% of the upstream's ``ratelimit-limit``.
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
    from proxy.access.routing import Router
    from proxy.core.errors import RegistryError

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


def _build_sync(
    raw: Mapping[str, Any],
    upstreams: Mapping[str, UpstreamConfig],
    default: str,
    platforms: Mapping[str, Any],
) -> SyncConfig:
    """Validate ``sync:`` and ``sync_ratelimit_floor``; a bad entry raises ConfigError naming it
    (``sync[0].repository``) and, where it has one, its repository."""
    from proxy.platforms.service import load_platforms

    kwargs: dict[str, Any] = {}
    if raw.get("sync_ratelimit_floor") not in (None, ""):
        fraction, count = _field(raw, "sync_ratelimit_floor", parse_ratelimit_floor)
        kwargs["ratelimit_floor_fraction"], kwargs["ratelimit_floor_count"] = fraction, count
    section = raw.get("sync")
    if section is None:
        section = []
    if not isinstance(section, list):
        raise ConfigError("sync", "must be a list of entries (repository, tags, ...)")
    default_platform = str(load_platforms(platforms).default)
    entries = []
    for i, item in enumerate(section):
        key = f"sync[{i}]"
        try:
            entries.append(_build_sync_entry(item, key, upstreams, default, default_platform))
        except ConfigError as exc:
            name = item.get("repository") if isinstance(item, Mapping) else None
            message = str(exc).removeprefix(f"configuration error: {exc.key}: ")
            if name and str(name) not in message:
                raise ConfigError(exc.key, f"{message} (entry {name})") from None
            raise
    return SyncConfig(entries=tuple(entries), **kwargs)


def _build_sync_entry(
    item: object,
    key: str,
    upstreams: Mapping[str, UpstreamConfig],
    default: str,
    default_platform: str,
) -> SyncEntry:
    from proxy.platforms.service import Platform

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
        interval = _field(item, "interval", parse_duration, f"{key}.")
        if interval <= 0:
            raise ConfigError(f"{key}.interval", "must be positive")
    return SyncEntry(name, upstream, repository, tags, chosen, interval)
