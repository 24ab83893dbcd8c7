"""An auth.docker.io look-alike: a real token server whose JWTs distribution 2.8 accepts.

Flow (the Docker registry token spec)::

    client --GET /v2/...--------------------> registry   401 WWW-Authenticate: Bearer
                                                          realm=<issuer.realm>,service=...,scope=...
    client --GET <realm>?service=S&scope=repository:NAME:pull[,push] (Basic u:p optional)--> issuer
           <-- {"token", "access_token", "expires_in", "issued_at"}
    client --GET /v2/... Authorization: Bearer <jwt>--> registry   200

How distribution 2.8 checks the JWT (``registry/auth/token``): the JOSE header must carry ``x5c``
(standard base64 DER certificates, leaf first); the chain must verify against the
``rootcertbundle`` file, and the leaf's key verifies the ES256 signature. ``iss`` must equal the
configured issuer and ``aud`` the configured service. ``exp``/``nbf`` are checked with a 60 s
leeway, so an "expired" token keeps working for another minute against a real registry.

Grant policy (deliberately simple): a known user gets every action it asks for; an anonymous
client gets only ``anonymous_actions`` (default: pull) and nothing on ``private_repositories``.
Every successful issue is appended to ``issued`` so tests can count token round-trips.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness._loop import BackgroundServer

if TYPE_CHECKING:
    from tests.harness.images import SeededImage
    from tests.harness.registry import Registry

#: One token request as recorded in ``TokenIssuer.issued``: (scopes as sent, username or None).
IssuedToken = tuple[tuple[str, ...], str | None]


def _make_signing_identity(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a self-signed certificate for it (the registry's trust root)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def parse_scope(scope: str) -> tuple[str, str, list[str]]:
    """Split ``repository:NAME:pull,push`` into (type, name, actions).

    The name may itself contain ``:`` (``repository:localhost:5000/foo:pull``), so split from
    both ends.
    """
    type_, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return type_, name, [a for a in actions.split(",") if a]


class TokenIssuer(BackgroundServer):
    """Token server on 127.0.0.1 running on its own thread; usable from sync and async tests.

    Attributes: ``realm`` (absolute token URL), ``service``, ``issuer`` (the JWT ``iss``),
    ``cert_pem`` (the registry's root certificate bundle), ``issued`` (every token handed out),
    ``refused`` (number of 401 answers). ``expires_in=None`` leaves ``expires_in`` out of the
    response (clients must then assume 60 s; the JWT lives 60 s).
    """

    def __init__(
        self,
        *,
        service: str = "registry.test",
        issuer: str = "regproxy-test-issuer",
        users: Mapping[str, str] | None = None,
        anonymous: bool = True,
        anonymous_actions: Iterable[str] = ("pull",),
        private_repositories: Iterable[str] = (),
        expires_in: int | None = 300,
    ) -> None:
        super().__init__("token-issuer")
        self.service = service
        self.issuer = issuer
        self.users: dict[str, str] = dict(users or {})
        self.anonymous = anonymous
        self.anonymous_actions = frozenset(anonymous_actions)
        self.private_repositories = frozenset(private_repositories)
        self.expires_in = expires_in
        self._key, self._cert = _make_signing_identity(issuer)
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        self._x5c = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._lock = threading.Lock()
        self.issued: list[IssuedToken] = []
        self.refused = 0

    @property
    def realm(self) -> str:
        """Absolute URL of the token endpoint (what goes into ``realm=``)."""
        return f"{self.url}/token"

    def write_cert(self, path: Path) -> Path:
        """Write the root certificate bundle for the registry's ``rootcertbundle``."""
        path.write_bytes(self.cert_pem)
        return path

    def reset(self) -> None:
        """Forget recorded token requests."""
        with self._lock:
            self.issued.clear()
            self.refused = 0

    def count(self, *, scope_contains: str | None = None, username: str | None = None) -> int:
        """Number of tokens issued, optionally only those with a matching scope / user."""
        with self._lock:
            return sum(
                1
                for scopes, user in self.issued
                if (scope_contains is None or any(scope_contains in s for s in scopes))
                and (username is None or user == username)
            )

    # -- token minting -----------------------------------------------------------------------

    def make_token(
        self,
        scopes: Iterable[str],
        *,
        username: str | None = None,
        lifetime: int = 300,
        audience: str | None = None,
    ) -> str:
        """Mint a JWT for *scopes* directly (no HTTP), applying the grant policy."""
        now = int(dt.datetime.now(dt.UTC).timestamp())
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": audience or self.service,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": self._grant(scopes, username),
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": self._x5c})

    def _grant(self, scopes: Iterable[str], username: str | None) -> list[dict[str, object]]:
        access: list[dict[str, object]] = []
        for scope in scopes:
            type_, name, actions = parse_scope(scope)
            if username is None:
                if name in self.private_repositories:
                    continue
                actions = [a for a in actions if a in self.anonymous_actions]
            if actions:
                access.append({"type": type_, "name": name, "actions": actions})
        return access

    def _authenticate(self, request: web.Request) -> tuple[bool, str | None]:
        """(accepted, username) from an optional Basic header."""
        header = request.headers.get("Authorization", "")
        if not header:
            return self.anonymous, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            username, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        return self.users.get(username) == password and username in self.users, username

    # -- HTTP ----------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._handle_get)
        app.router.add_post("/token", self._handle_post)
        return app

    def _refuse(self) -> web.Response:
        with self._lock:
            self.refused += 1
        return web.json_response(
            {"details": "incorrect username or password"},
            status=401,
            headers={"WWW-Authenticate": f'Basic realm="{self.realm}"'},
        )

    def _issue(self, scopes: list[str], username: str | None, service: str) -> web.Response:
        with self._lock:
            self.issued.append((tuple(scopes), username))
        lifetime = self.expires_in if self.expires_in is not None else 60
        token = self.make_token(scopes, username=username, lifetime=lifetime, audience=service)
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _handle_get(self, request: web.Request) -> web.Response:
        accepted, username = self._authenticate(request)
        if not accepted:
            return self._refuse()
        scopes = request.query.getall("scope", [])
        service = request.query.get("service", self.service)
        return self._issue(scopes, username, service)

    async def _handle_post(self, request: web.Request) -> web.Response:
        """OAuth2 password grant, as containerd tries before falling back to GET."""
        form = await request.post()
        username = str(form.get("username", "")) or None
        password = str(form.get("password", ""))
        if form.get("grant_type") != "password" or username is None:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if self.users.get(username) != password or username not in self.users:
            return self._refuse()
        scopes = " ".join(str(s) for s in form.getall("scope", [])).split()
        service = str(form.get("service", self.service))
        return self._issue(scopes, username, service)


@dataclass
class TokenRegistry:
    """A token-protected registry, its issuer, the user that may push, and a seeded image."""

    registry: Registry
    issuer: TokenIssuer
    creds: tuple[str, str]
    image: SeededImage

    @property
    def url(self) -> str:
        """The registry's ``http://127.0.0.1:PORT``."""
        return self.registry.url

    @property
    def host(self) -> str:
        """The registry's ``127.0.0.1:PORT``."""
        return self.registry.host
