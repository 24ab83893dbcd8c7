"""Who may pull what: client authentication (htpasswd, bcrypt) and per-repository rules.

Off unless configured::

    auth:
      htpasswd: /etc/regproxy/htpasswd     # bcrypt entries (htpasswd -B); enables logins
      rules:                               # who may pull which upstream/repository globs
        - users: [anonymous]               # "anonymous", "*" (any logged-in user) or names
          repositories: ["docker.io/library/*"]
        - users: ["*"]
          repositories: ["*"]
      admins: [alice]                      # may open the console (/_regproxy/); default none

Without ``rules``, logged-in users may pull everything and anonymous clients nothing (when an
htpasswd file is set) or everything (when not). A request is checked before anything is looked
up, so a denied client learns nothing about the content: not its digest, size, or existence.

Clients answer the ``401`` challenge (``WWW-Authenticate: Basic``) with credentials, as ``docker
login`` sets up. A Docker daemon never sends credentials to a ``registry-mirrors`` entry (it sends
its Docker Hub login to them instead, which regproxy neither logs nor forwards): mirror use is for
anonymous rules; authenticated pulls address regproxy directly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
from cachetools import TTLCache

from proxy.config import ConfigError
from proxy.errors import Denied, Unauthorized

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
REALM = "regproxy"


@dataclass(frozen=True)
class Rule:
    users: tuple[str, ...]
    repositories: tuple[str, ...]

    def grants(self, user: str | None, target: str) -> bool:
        who = ANONYMOUS if user is None else user
        user_ok = who in self.users or (user is not None and "*" in self.users)
        return user_ok and any(fnmatch.fnmatchcase(target, glob) for glob in self.repositories)


@dataclass(frozen=True)
class AuthConfig:
    htpasswd: Path | None = None
    rules: tuple[Rule, ...] = ()
    #: Users who may open the operator's console (``proxy.console``); defaults to none.
    admins: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or bool(self.rules)


def load_auth(section: Mapping[str, Any]) -> AuthConfig:
    unknown = set(section) - {"htpasswd", "rules", "admins"}
    if unknown:
        raise ConfigError(f"auth.{sorted(unknown)[0]}", "unknown setting")
    htpasswd = Path(str(section["htpasswd"])) if section.get("htpasswd") else None
    rules_raw = section.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError("auth.rules", "must be a list of {users, repositories}")
    rules = []
    for i, raw in enumerate(rules_raw):
        key = f"auth.rules[{i}]"
        if not isinstance(raw, Mapping) or set(raw) - {"users", "repositories"}:
            raise ConfigError(key, "must be a mapping with users and repositories")
        users = raw.get("users")
        repos = raw.get("repositories")
        if isinstance(users, str):
            users = [users]
        if isinstance(repos, str):
            repos = [repos]
        if not users or not isinstance(users, list):
            raise ConfigError(f"{key}.users", "must list user names, anonymous or *")
        if not repos or not isinstance(repos, list):
            raise ConfigError(f"{key}.repositories", "must list upstream/repository globs")
        rules.append(Rule(tuple(map(str, users)), tuple(map(str, repos))))
    admins = section.get("admins") or []
    if isinstance(admins, str):
        admins = [admins]
    if not isinstance(admins, list):
        raise ConfigError("auth.admins", "must list user names")
    return AuthConfig(htpasswd, tuple(rules), tuple(map(str, admins)))


def read_htpasswd(path: Path) -> dict[str, bytes]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError("auth.htpasswd", f"cannot read {path}: {exc.strerror}") from None
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ConfigError("auth.htpasswd", f"line {number}: only bcrypt entries are supported")
        users[user] = hashed.encode()
    return users


class Authenticator:
    """Checks Basic credentials and the rules; see the module docstring."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.users = read_htpasswd(config.htpasswd) if config.htpasswd else {}
        # bcrypt is deliberately slow; remember good answers briefly (keyed by a hash, so no
        # password is kept in memory in the clear).
        self._verified: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=300)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def challenge(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Basic realm="{REALM}"'}

    async def user(self, authorization: str | None) -> str | None:
        """The logged-in user, or None (anonymous, or credentials we do not know)."""
        if not authorization or not self.users:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        fingerprint = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        if self._verified.get(fingerprint) == user:
            return user
        hashed = self.users.get(user)
        if hashed is None:
            return None
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        if not ok:
            log.warning("failed login user=%s", user)
            return None
        self._verified[fingerprint] = user
        return user

    def is_admin(self, user: str | None) -> bool:
        """May ``user`` (already authenticated) open the operator's console?"""
        return user is not None and user in self.config.admins

    def allowed(self, user: str | None, upstream: str, repository: str) -> bool:
        target = f"{upstream}/{repository}"
        if not self.config.rules:
            return user is not None or not self.users
        return any(rule.grants(user, target) for rule in self.config.rules)

    async def check_login(self, authorization: str | None) -> None:
        """``GET /v2/``: with an htpasswd file, only valid credentials pass (``docker login``)."""
        if self.users and await self.user(authorization) is None:
            raise Unauthorized(headers=self.challenge())

    async def check(self, authorization: str | None, upstream: str, repository: str) -> str | None:
        """Allow the pull or raise UNAUTHORIZED (anonymous) / DENIED (logged in, not allowed)."""
        user = await self.user(authorization)
        if self.allowed(user, upstream, repository):
            return user
        if user is None:
            raise Unauthorized(headers=self.challenge())
        raise Denied()
