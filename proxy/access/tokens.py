"""The Bearer token service: how anonymous and logged-in clients share one endpoint.

With ``auth:`` on, regproxy speaks the Docker registry token protocol, as Docker Hub,
distribution's token auth and Harbor do::

    client --GET /v2/-------------------------------------> 401 WWW-Authenticate: Bearer
                                                              realm="<regproxy>/token",service="S"
    client --GET /token?service=S&scope=repository:NAME:pull  (Basic user:password, or nothing)
           <-- {"token", "access_token", "expires_in", "issued_at"}   (POST: OAuth2 password grant)
    client --GET /v2/NAME/... Authorization: Bearer <jwt>--> 200, or 401 error="insufficient_scope"

A token is an HS256 JWT signed with ``auth.token.signing_key_file`` (or
``REGPROXY_AUTH_TOKEN_SIGNING_KEY``): every replica given the same key verifies every other's
tokens. Without a key each process makes a random one and says so in its log; tokens then fail
on other replicas and after a restart (clients simply ask for a new one).

Claims::

    iss "regproxy"   sub  user name, "" for anonymous   aud  the service
    iat/nbf/exp      (expires_in, default 5 minutes)     jti  random
    access [{"type": "repository", "name": NAME, "actions": ["pull"]}]   only granted scopes

What a token grants is decided by ``proxy.access.auth`` at issue time (the rules allow the user
to pull NAME through some route) and checked again on every request against the route actually
taken, so a token never carries more than the rules allow at the time of use. Only ``pull`` is ever
granted: regproxy is read-only.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from proxy.core.settings import ConfigError, parse_duration, parse_url

log = logging.getLogger(__name__)

ISSUER = "regproxy"
ALGORITHM = "HS256"
#: HS256 keys shorter than the hash are weak (RFC 7518 3.2); refuse them at start-up.
MIN_KEY_BYTES = 32
#: Clock skew tolerated between replicas when checking ``nbf``/``exp``.
LEEWAY = 10.0
MAX_SCOPES = 32
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")

TOKEN_KEYS = frozenset({"signing_key_file", "signing_key", "service", "realm", "expires_in"})


@dataclass(frozen=True)
class TokenConfig:
    """The ``auth.token`` section."""

    #: HMAC key shared by all replicas; a random per-process key when unset. Not in repr.
    signing_key: bytes | None = field(default=None, repr=False)
    #: The ``service`` of the challenge and the tokens' ``aud``; defaults to ``regproxy``.
    service: str = "regproxy"
    #: Absolute URL of the token endpoint; defaults to ``<scheme>://<Host>/token`` of each
    #: request (``X-Forwarded-Proto`` honoured).
    realm: str | None = None
    #: Token lifetime in seconds; defaults to 300.
    expires_in: float = 300.0


def load_token_config(section: object) -> TokenConfig:
    if section is None:
        return TokenConfig()
    if not isinstance(section, Mapping):
        raise ConfigError("auth.token", "must be a mapping")
    unknown = set(section) - TOKEN_KEYS
    if unknown:
        raise ConfigError(f"auth.token.{sorted(unknown)[0]}", "unknown setting")
    kwargs: dict[str, Any] = {}
    key: bytes | None = None
    key_name = "auth.token.signing_key"
    if section.get("signing_key_file"):
        key_name = "auth.token.signing_key_file"
        path = Path(str(section["signing_key_file"]))
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                "auth.token.signing_key_file", f"cannot read {path}: {exc.strerror}"
            ) from None
    elif section.get("signing_key"):
        key = str(section["signing_key"]).strip().encode()
    if key is not None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(
                key_name,
                f"the signing key must be at least {MIN_KEY_BYTES} bytes (openssl rand -hex 32)",
            )
        kwargs["signing_key"] = key
    if section.get("service"):
        service = str(section["service"])
        if not re.fullmatch(r"[A-Za-z0-9.:_\-]+", service):
            raise ConfigError("auth.token.service", "letters, digits and . : _ - only")
        kwargs["service"] = service
    if section.get("realm"):
        try:
            kwargs["realm"] = parse_url(section["realm"])
        except ValueError as exc:
            raise ConfigError("auth.token.realm", str(exc)) from None
    if section.get("expires_in") not in (None, ""):
        try:
            expires = parse_duration(section["expires_in"])
        except ValueError as exc:
            raise ConfigError("auth.token.expires_in", str(exc)) from None
        if not 60 <= expires <= 86400:
            raise ConfigError("auth.token.expires_in", "must be between 1m and 24h")
        kwargs["expires_in"] = expires
    return TokenConfig(**kwargs)


@dataclass(frozen=True)
class Scope:
    """``repository:NAME:actions`` as clients ask for it."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        type_, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and type_ and name):
            return None
        return cls(type_, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class Grant:
    """A verified token: who it is for and which repository names it may pull."""

    user: str | None
    names: frozenset[str]


class TokenSigner:
    """Issues and verifies regproxy's JWTs; see the module docstring."""

    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        key = config.signing_key
        if key is None:
            key = secrets.token_bytes(32)
            log.warning(
                "no auth.token.signing_key_file: tokens are signed with a random key of this "
                "process and fail on other replicas and after a restart"
            )
        self._key = key
        #: Names the key in the JOSE header without revealing it (rotation, debugging).
        self.key_id = hashlib.sha256(b"regproxy-kid\0" + key).hexdigest()[:16]

    @property
    def service(self) -> str:
        return self.config.service

    def realm(self, request: web.Request) -> str:
        if self.config.realm:
            return self.config.realm
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto not in ("http", "https"):
            proto = request.scheme
        host = request.host
        if not _HOST_RE.fullmatch(host):
            # Never echo a header that could break out of the quoted realm.
            host = "localhost"
        return f"{proto}://{host}/token"

    def challenge(
        self, request: web.Request, *, scope: str | None = None, error: str | None = None
    ) -> dict[str, str]:
        parts = [f'realm="{self.realm(request)}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return {"WWW-Authenticate": "Bearer " + ",".join(parts)}

    def issue(self, user: str | None, names: list[str]) -> dict[str, Any]:
        now = int(time.time())
        expires_in = int(self.config.expires_in)
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": self.service,
            "iat": now,
            "nbf": now,
            "exp": now + expires_in,
            "jti": secrets.token_hex(16),
            "access": [
                {"type": "repository", "name": name, "actions": ["pull"]}
                for name in dict.fromkeys(names)
            ],
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.key_id})
        return {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def verify(self, token: str) -> Grant | None:
        """The grant of a token this service issued and that is still valid; else None."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self.service,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "nbf", "aud", "iss", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        names = set()
        access = claims.get("access")
        if isinstance(access, list):
            for entry in access:
                if (
                    isinstance(entry, dict)
                    and entry.get("type") == "repository"
                    and isinstance(entry.get("name"), str)
                    and "pull" in (entry.get("actions") or ())
                ):
                    names.add(entry["name"])
        sub = claims.get("sub")
        return Grant(sub if isinstance(sub, str) and sub else None, frozenset(names))


def requested_scopes(values: list[str]) -> list[Scope]:
    """``scope`` parameters (repeatable, each possibly space-separated) -> parsed scopes."""
    scopes = []
    for value in values:
        for text in value.split():
            scope = Scope.parse(text)
            if scope is not None:
                scopes.append(scope)
            if len(scopes) >= MAX_SCOPES:
                return scopes
    return scopes
