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
      token:                               # the Bearer token service (proxy.access.tokens)
        signing_key_file: /run/secrets/regproxy-token-key   # same on every replica
      login_limit: {failures: 10, window: 1m}   # then 429 (proxy.access.throttle)

Without ``rules``, logged-in users may pull everything and anonymous clients nothing (when an
htpasswd file is set) or everything (when not). A request is checked before anything is looked
up, so a denied client learns nothing about the content: not its digest, size, or existence.

Clients are challenged with ``WWW-Authenticate: Bearer realm="<regproxy>/token"`` and fetch a token
there (``proxy.access.tokens``): anonymously for what anonymous rules allow, or with the Basic
credentials of an htpasswd user (``docker login``, podman, skopeo, ``ctr --user``) for what that
user's rules allow. Basic credentials are also accepted on every request (curl, scripts).

A Docker daemon sends its *Docker Hub* login to every ``registry-mirrors`` entry. At ``/token`` an
unknown user asking for repository scopes is therefore served as anonymous (never an error, which
would make dockerd abandon the mirror); an unknown user asking for no scope is a login attempt
(``docker login``, ``podman login``) and gets ``401``, as does a known user's wrong password.
Those credentials are neither logged nor forwarded upstream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import bcrypt
from aiohttp import web
from cachetools import TTLCache

from proxy.access.routing import Router
from proxy.access.throttle import LoginLimit, LoginThrottle, load_login_limit
from proxy.access.tokens import Grant, TokenConfig, TokenSigner, load_token_config, requested_scopes
from proxy.core.errors import Denied, ManifestInvalid, RegistryError, Unauthorized
from proxy.core.reference import check_name
from proxy.core.settings import ConfigError

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
    #: Users who may open the operator's console (``proxy.ops.console``); defaults to none.
    admins: tuple[str, ...] = ()
    token: TokenConfig = field(default_factory=TokenConfig)
    #: Failed logins per client address before it is answered 429 (``proxy.access.throttle``).
    login_limit: LoginLimit = field(default_factory=LoginLimit)

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or bool(self.rules)


def load_auth(section: Mapping[str, Any]) -> AuthConfig:
    unknown = set(section) - {"htpasswd", "rules", "admins", "token", "login_limit"}
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
    return AuthConfig(
        htpasswd,
        tuple(rules),
        tuple(map(str, admins)),
        load_token_config(section.get("token")),
        load_login_limit(section.get("login_limit")),
    )


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


#: Largest ``POST /token`` form read (username, password, service, a few scopes).
MAX_TOKEN_FORM = 8192


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """``(user, password)`` of a Basic header; None when absent, malformed or another scheme."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class Authenticator:
    """Checks Basic credentials, Bearer tokens and the rules; see the module docstring."""

    def __init__(self, config: AuthConfig, router: Router | None = None) -> None:
        self.config = config
        self.router = router
        self.users = read_htpasswd(config.htpasswd) if config.htpasswd else {}
        # bcrypt is deliberately slow; remember good answers briefly (keyed by a hash, so no
        # password is kept in memory in the clear).
        self._verified: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=300)
        self.tokens = TokenSigner(config.token) if config.enabled else None
        self.throttle = LoginThrottle(config.login_limit)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def _challenge(
        self, request: web.Request, *, scope: str | None = None, error: str | None = None
    ) -> dict[str, str]:
        assert self.tokens is not None
        return self.tokens.challenge(request, scope=scope, error=error)

    async def _password_ok(self, user: str, password: str, client: str | None = None) -> bool:
        """Whether ``password`` is ``user``'s; raises TOOMANYREQUESTS when ``client`` (its
        address) failed too often lately, unless these credentials are known good."""
        hashed = self.users.get(user)
        if hashed is None:
            return False
        fingerprint = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        if self._verified.get(fingerprint) == user:
            return True
        await self.throttle.check(client)
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        if not ok:
            log.warning("failed login user=%s client=%s", user, client)
            await self.throttle.failed(client)
            return False
        self._verified[fingerprint] = user
        return True

    async def user(self, authorization: str | None, client: str | None = None) -> str | None:
        """The user of Basic credentials, or None (anonymous, or credentials we do not know);
        ``client`` is the request's address (login throttling)."""
        creds = _basic_credentials(authorization)
        if creds is None or not self.users:
            return None
        return creds[0] if await self._password_ok(*creds, client) else None

    def is_admin(self, user: str | None) -> bool:
        """May ``user`` (already authenticated) open the operator's console?"""
        return user is not None and user in self.config.admins

    def allowed(self, user: str | None, upstream: str, repository: str) -> bool:
        target = f"{upstream}/{repository}"
        if not self.config.rules:
            return user is not None or not self.users
        return any(rule.grants(user, target) for rule in self.config.rules)

    def _routes(self, name: str, ns: str | None, *, any_ns: bool = False) -> set[tuple[str, str]]:
        """Where path name ``name`` leads with ``?ns=ns``; with ``any_ns`` also under every
        upstream (a token request does not carry containerd's ``?ns=``). Unroutable: nowhere."""
        if self.router is None:
            return set()
        candidates: list[str | None] = [ns]
        first, sep, _ = name.partition("/")
        if any_ns and not (sep and self.router.lookup(first)):
            # A name that starts with an upstream's name (``corp/team/app``) is that upstream's:
            # no token for it because of a same-named repository elsewhere.
            candidates += list(self.router.upstreams)
        routes = set()
        for candidate in candidates:
            try:
                routes.add(self.router.route(name, candidate))
            except RegistryError:
                continue
        return routes

    def may_pull(self, user: str | None, name: str) -> bool:
        """Whether a token for ``repository:name:pull`` may be issued to ``user``."""
        try:
            check_name(name)
        except RegistryError:
            return False
        return any(
            self.allowed(user, up, repo) for up, repo in self._routes(name, None, any_ns=True)
        )

    def _covers(
        self, grant: Grant, name: str, upstream: str, repository: str, ns: str | None
    ) -> bool:
        if name in grant.names:
            return True
        return any((upstream, repository) in self._routes(n, ns) for n in grant.names)

    def _grant(self, token: str) -> Grant | None:
        """A token's grant; None when invalid, expired, or its user was removed since."""
        assert self.tokens is not None
        grant = self.tokens.verify(token)
        if grant is not None and grant.user is not None and grant.user not in self.users:
            return None
        return grant

    def challenge(self) -> dict[str, str]:
        """The Basic challenge of the pages people open (console, sync status): browsers and
        curl answer it; registry clients get the Bearer one (``check_base``, ``check``)."""
        return {"WWW-Authenticate": f'Basic realm="{REALM}"'}

    async def check_login(self, authorization: str | None, client: str | None = None) -> None:
        """A page for people (``/_regproxy/sync``): with an htpasswd file, only valid Basic
        credentials pass; else the Basic challenge."""
        if self.users and await self.user(authorization, client) is None:
            raise Unauthorized(headers=self.challenge())

    async def check_base(self, request: web.Request) -> None:
        """``GET /v2/``: a valid token or valid Basic credentials pass; anything else is
        challenged to fetch a token (the ping tells clients how to authenticate)."""
        if not self.enabled:
            return
        authorization = request.headers.get("Authorization") or ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            if self._grant(value.strip()) is not None:
                return
            raise Unauthorized(headers=self._challenge(request, error="invalid_token"))
        if await self.user(authorization, request.remote) is None:
            raise Unauthorized(headers=self._challenge(request))

    async def check(
        self, request: web.Request, name: str, upstream: str, repository: str
    ) -> str | None:
        """Allow the pull of path name ``name`` (routed to ``upstream/repository``) or raise
        UNAUTHORIZED (anonymous, or a token without the scope) / DENIED (a user the rules do not
        allow). Nothing has been looked up yet, so neither answer reveals whether it exists."""
        authorization = request.headers.get("Authorization") or ""
        scheme, _, value = authorization.partition(" ")
        scope = f"repository:{name}:pull"
        if scheme.lower() == "bearer" and self.tokens is not None:
            grant = self._grant(value.strip())
            if grant is None:
                raise Unauthorized(
                    {"reason": "invalid or expired token"},
                    headers=self._challenge(request, scope=scope, error="invalid_token"),
                )
            if not self.allowed(grant.user, upstream, repository):
                if grant.user is not None:
                    raise Denied()
                raise Unauthorized(
                    headers=self._challenge(request, scope=scope, error="insufficient_scope")
                )
            if not self._covers(grant, name, upstream, repository, request.query.get("ns")):
                raise Unauthorized(
                    headers=self._challenge(request, scope=scope, error="insufficient_scope")
                )
            return grant.user
        user = await self.user(authorization, request.remote)
        if self.allowed(user, upstream, repository):
            return user
        if user is None:
            raise Unauthorized(headers=self._challenge(request, scope=scope))
        raise Denied()

    async def token_endpoint(self, request: web.Request) -> web.Response:
        """``GET /token`` (Basic credentials or none) and ``POST /token`` (OAuth2 password
        grant, as containerd sends it): a token for the granted subset of the scopes asked."""
        assert self.tokens is not None
        creds: tuple[str, str] | None
        if request.method == "POST":
            raw = b""
            while not request.content.at_eof():
                raw += await request.content.read(MAX_TOKEN_FORM + 1 - len(raw))
                if len(raw) > MAX_TOKEN_FORM:
                    raise ManifestInvalid(message="token request too large")
            form = parse_qs(raw.decode(errors="replace"))
            if form.get("grant_type", [""])[0] != "password":
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            creds = (form.get("username", [""])[0], form.get("password", [""])[0])
            scopes = requested_scopes(form.get("scope", []))
        elif request.method in ("GET", "HEAD"):
            creds = _basic_credentials(request.headers.get("Authorization"))
            scopes = requested_scopes(request.query.getall("scope", []))
        else:
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        user: str | None = None
        if creds is not None and creds[0]:
            name, password = creds
            if name in self.users:
                if not await self._password_ok(name, password, request.remote):
                    raise Unauthorized({"reason": "invalid username or password"})
                user = name
            elif not scopes:
                # No scope: a login check (docker/podman login) by a user we do not know.
                await self.throttle.check(request.remote)
                log.warning("failed login user=%s client=%s", name, request.remote)
                await self.throttle.failed(request.remote)
                raise Unauthorized({"reason": "invalid username or password"})
            # else: an unknown user asking for scopes is the Docker Hub login dockerd sends to
            # every mirror; it is served as anonymous.
        granted = [
            s.name
            for s in scopes
            if s.type == "repository" and "pull" in s.actions and self.may_pull(user, s.name)
        ]
        return web.json_response(
            self.tokens.issue(user, granted), headers={"Cache-Control": "no-store"}
        )
