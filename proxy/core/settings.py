"""The vocabulary of configuration: :class:`ConfigError` and the value parsers every feature uses.

Each feature of regproxy owns its settings: a frozen dataclass and a ``parse_*`` function that
validates its own section of the merged tree (YAML < ``REGPROXY_*`` environment < flags) and
raises :class:`ConfigError` naming the dotted key and the reason. :mod:`proxy.config` assembles
them. This module imports nothing of regproxy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


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


def parse_workers(value: object) -> int:
    """A count of worker processes: 1 to 256."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of processes")
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number of processes") from None
    if not 1 <= count <= 256:
        raise ValueError(f"{count} is not between 1 and 256")
    return count


def parse_url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL; use username and password_file")
    return text


_BARE_IPV6_URL = re.compile(r"(https?://)([0-9A-Fa-f.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f.]*):(\d+)(/.*)?")


def parse_advertise_url(value: object) -> str:
    """An http(s) URL; a bare IPv6 address before the port (``http://fd00::5:5000``, what
    ``http://$(POD_IP):5000`` becomes on an IPv6 pod) is read as ``http://[fd00::5]:5000``."""
    text = str(value).strip().rstrip("/")
    match = _BARE_IPV6_URL.fullmatch(text)
    if match:
        scheme, host, port, path = match.groups()
        text = f"{scheme}[{host}]:{port}{path or ''}"
    return parse_url(text)


def parse_listen(value: object) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``:PORT`` is every address, IPv4 and IPv6 (host "")."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_log_level(value: object) -> str:
    text = str(value).strip().lower()
    if text == "warn":
        text = "warning"
    if text not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return text


# -- section helpers ------------------------------------------------------------------------


def field_of(raw: Mapping[str, Any], key: str, parse: Any, prefix: str = "") -> Any:
    """``parse(raw[key])``, a failure raised as :class:`ConfigError` naming ``prefix + key``."""
    try:
        return parse(raw[key])
    except (ValueError, TypeError) as exc:
        raise ConfigError(prefix + key, str(exc)) from None


def read_secret(path: object, key: str) -> str:
    try:
        return Path(str(path)).read_text().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read the password file: {exc.strerror}") from None


def section_of(value: object, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a mapping")
    return value


def check_keys(section: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown setting")
