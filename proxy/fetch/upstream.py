"""The client for one upstream registry: auth, redirects, retries, rate-limit back-off.

Every request goes through :meth:`Upstream.request`, which

* attaches a Bearer token for the repository's pull scope (fetched on the first 401 challenge,
  cached per scope until it expires, shared by concurrent requests) or Basic credentials;
* follows redirects itself, sending ``Authorization`` only to the upstream's own origin (blob
  downloads are commonly redirected to a CDN);
* retries connection errors and 502/503/504 with back-off before returning a response;
* remembers a 429's ``Retry-After`` and fails fast until then, instead of hammering the upstream;
* translates ``aiohttp``/``OSError`` failures into :class:`proxy.core.errors.UpstreamError`.

Client credentials are never forwarded: only this upstream's configured credentials are used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
from yarl import URL

from proxy.core.errors import (
    UpstreamRateLimited,
    UpstreamStatus,
    UpstreamUnreachable,
)
from proxy.core.metrics import Metrics
from proxy.core.singleflight import SingleFlight
from proxy.fetch import threadget
from proxy.fetch.settings import UpstreamConfig

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
#: Tokens without ``expires_in`` live 60 s (Docker's token spec); refresh a little early.
DEFAULT_TOKEN_TTL = 60.0
TOKEN_EARLY_REFRESH = 10.0
USER_AGENT = "regproxy/0.1"

#: aiohttp's read buffer per upstream connection (its default is 64 KiB): a blob body arrives
#: in ~250 KB reads, and a small buffer pauses and resumes the socket for most of them.
READ_BUFSIZE = 1024 * 1024

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: Mapping[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``WWW-Authenticate: Bearer realm="...",service="...",scope="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: Bytes of an error response read for its registry error code.
ERROR_BODY_MAX = 64 * 1024


async def _error_code(resp: aiohttp.ClientResponse) -> str | None:
    """The registry error code in an error response body, if any (bounded read)."""
    try:
        body = await resp.content.read(ERROR_BODY_MAX)
    except (TimeoutError, aiohttp.ClientError):
        return None
    return error_code(body)


def error_code(body: bytes) -> str | None:
    """The code of a registry error body (``{"errors": [{"code": ...}]}``), if any."""
    try:
        errors = json.loads(body).get("errors") or []
        return str(errors[0].get("code")) if errors else None
    except (ValueError, AttributeError, IndexError):
        return None


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class Upstream:
    """One configured upstream registry, with its own connection pool and back-off state."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        retries: int = 3,
        retry_backoff: float = 0.2,
    ) -> None:
        self.config = config
        self.name = config.name
        self.base = URL(config.url)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, _Token] = {}
        self._token_flight: SingleFlight[str, _Token] = SingleFlight()
        self._challenge: Challenge | None = None
        self.backoff_until = 0.0
        #: Last ``ratelimit-remaining`` seen from Docker Hub, or None.
        self.ratelimit_remaining: int | None = None
        #: Last ``ratelimit-limit`` seen (``100;w=21600`` -> 100), or None.
        self.ratelimit_limit: int | None = None
        self.metrics: Metrics | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT},
            read_bufsize=READ_BUFSIZE,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        return self._session

    # -- auth ------------------------------------------------------------------------------------

    def _basic(self) -> str | None:
        if not self.config.username:
            return None
        raw = f"{self.config.username}:{self.config.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def auth_header(self, scope: str) -> str | None:
        """The ``Authorization`` a request for ``scope`` would carry now (None: none known)."""
        if self._challenge is None:
            return None
        if self._challenge.scheme == "basic":
            return self._basic()
        token = self._tokens.get(scope)
        if token and token.expires_at > time.monotonic():
            return f"Bearer {token.value}"
        return None

    async def _token(self, scope: str, challenge: Challenge) -> _Token:
        return await self._token_flight.run(scope, lambda: self._fetch_token(scope, challenge))

    async def _fetch_token(self, scope: str, challenge: Challenge) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise UpstreamStatus("bearer challenge without realm", upstream=self.name, status=401)
        query = {"scope": scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        url = URL(realm).update_query(query)
        try:
            async with self.session.get(
                url, headers=headers, allow_redirects=True, **proxy_args(url)
            ) as resp:
                self.count("GET", str(resp.status))
                if resp.status != 200:
                    raise UpstreamStatus(
                        f"token request failed with {resp.status}",
                        upstream=self.name,
                        url=str(url.with_query(None)),
                        status=resp.status,
                    )
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamUnreachable(
                f"token request failed: {type(exc).__name__}", upstream=self.name
            ) from exc
        value = body.get("token") or body.get("access_token")
        if not isinstance(value, str) or not value:
            raise UpstreamStatus("token response without a token", upstream=self.name, status=502)
        expires_in = float(body.get("expires_in") or DEFAULT_TOKEN_TTL)
        ttl = max(DEFAULT_TOKEN_TTL, expires_in) - TOKEN_EARLY_REFRESH
        token = _Token(value, time.monotonic() + ttl)
        self._tokens[scope] = token
        return token

    # -- requests --------------------------------------------------------------------------------

    def check_backoff(self) -> None:
        remaining = self.backoff_until - time.monotonic()
        if remaining > 0:
            raise UpstreamRateLimited(
                "upstream is rate limiting; backing off", upstream=self.name, retry_after=remaining
            )

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request to the upstream and yield the response with an ``expect``-ed status.

        Other statuses raise :class:`UpstreamStatus` (429: :class:`UpstreamRateLimited`).
        """
        self.check_backoff()
        url = self.url_for(path)
        if query:
            url = url.with_query(query)
        attempt = 0
        while True:
            resp = await self._send(method, url, scope=scope, headers=headers or {})
            if resp.status in RETRY_STATUSES and attempt < self._retries:
                resp.release()
                attempt += 1
                await asyncio.sleep(self._retry_backoff * 2 ** (attempt - 1))
                continue
            break
        try:
            self.observe(resp.headers)
            if resp.status not in expect:
                await self._raise_for(resp, url)
            yield resp
        finally:
            resp.release()

    def url_for(self, path: str) -> URL:
        """``path`` (``/v2/...``) on this upstream."""
        return self.base.with_path(self.base.path.rstrip("/") + path, encoded=False)

    async def _send(
        self, method: str, url: URL, *, scope: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """One logical request: auth challenge once, redirects, connection retries."""
        attempt = 0
        while True:
            try:
                return await self._send_once(method, url, scope=scope, headers=headers)
            except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
                if attempt >= self._retries:
                    raise UpstreamUnreachable(
                        f"{method} failed: {type(exc).__name__}: {exc}",
                        upstream=self.name,
                        url=str(url),
                    ) from exc
                attempt += 1
                await asyncio.sleep(self._retry_backoff * 2 ** (attempt - 1))
            except aiohttp.ClientError as exc:
                raise UpstreamUnreachable(
                    f"{method} failed: {type(exc).__name__}", upstream=self.name, url=str(url)
                ) from exc

    async def _send_once(
        self, method: str, url: URL, *, scope: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        retried_auth = False
        while True:
            hdrs = dict(headers)
            auth = self.auth_header(scope)
            if auth:
                hdrs["Authorization"] = auth
            resp = await self._follow(method, url, hdrs)
            if resp.status != 401 or retried_auth:
                return resp
            header = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if not await self.authorize(scope, header):
                return await self._follow(method, url, hdrs)
            retried_auth = True

    async def authorize(self, scope: str, www_authenticate: str) -> bool:
        """Take up a 401's challenge: fetch a token for ``scope`` (Bearer) or use the configured
        credentials (Basic). False when it cannot be answered."""
        challenge = parse_challenge(www_authenticate)
        if challenge is None or challenge.scheme not in ("bearer", "basic"):
            return False
        if challenge.scheme == "basic" and not self.config.username:
            return False
        self._challenge = challenge
        self._tokens.pop(scope, None)
        if challenge.scheme == "bearer":
            await self._token(scope, challenge)
        return True

    async def _follow(
        self, method: str, url: URL, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Send, following redirects; ``Authorization`` goes to the upstream's origin only."""
        origin = self.base.origin()
        for _ in range(threadget.MAX_REDIRECTS + 1):
            hdrs = (
                headers
                if url.origin() == origin
                else {k: v for k, v in headers.items() if k.lower() != "authorization"}
            )
            try:
                resp = await self.session.request(
                    method, url, headers=hdrs, allow_redirects=False, **proxy_args(url)
                )
            except BaseException:
                self.count(method, "error")
                raise
            self.count(method, str(resp.status))
            if resp.status not in threadget.REDIRECTS or "Location" not in resp.headers:
                return resp
            url = url.join(URL(resp.headers["Location"]))
            resp.release()
            if resp.status == 303:
                method = "GET"
        raise UpstreamStatus("too many redirects", upstream=self.name, url=str(url), status=508)

    def count(self, method: str, status: str) -> None:
        """Count one upstream request by its answer (also those of ``proxy.fetch.threadget``)."""
        if self.metrics is not None:
            self.metrics.upstream_requests.labels(self.name, method, status).inc()

    def observe(self, headers: Mapping[str, str]) -> None:
        """Note Docker Hub's rate-limit headers of a response."""
        limit = headers.get("ratelimit-limit")
        if limit:
            with contextlib.suppress(ValueError):
                self.ratelimit_limit = int(limit.split(";")[0])
        remaining = headers.get("ratelimit-remaining")
        if remaining:
            with contextlib.suppress(ValueError):
                self.ratelimit_remaining = int(remaining.split(";")[0])
            if self.metrics is not None and self.ratelimit_remaining is not None:
                self.metrics.ratelimit_remaining.labels(self.name).set(self.ratelimit_remaining)

    async def _raise_for(self, resp: aiohttp.ClientResponse, url: URL) -> None:
        code = None
        if resp.status != 429 and resp.method != "HEAD":
            code = await _error_code(resp)
        self.raise_for(resp.status, resp.headers, url, code)

    def raise_for(
        self, status: int, headers: Mapping[str, str], url: URL | str, code: str | None
    ) -> NoReturn:
        """Raise what an unexpected answer means: a 429 starts the back-off."""
        safe_url = str(URL(str(url)).with_query(None))
        if status == 429:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            wait = retry_after if retry_after is not None else 60.0
            self.backoff_until = max(self.backoff_until, time.monotonic() + wait)
            log.warning("upstream rate limited upstream=%s retry_after=%.0f", self.name, wait)
            raise UpstreamRateLimited(
                "upstream answered 429", upstream=self.name, url=safe_url, retry_after=retry_after
            )
        raise UpstreamStatus(
            f"upstream answered {status}",
            upstream=self.name,
            url=safe_url,
            status=status,
            code=code,
        )


def proxy_args(url: URL) -> dict[str, Any]:
    """aiohttp's arguments to reach ``url`` through the proxy the environment names for it
    (``HTTP_PROXY``/``HTTPS_PROXY``, ``NO_PROXY``; none: directly; credentials in the proxy's
    URL are sent to it). Per request, so that a redirect to a CDN is judged by its own host."""
    proxy = threadget.env_proxy(str(url))
    return {} if proxy is None else {"proxy": URL(proxy)}


class Upstreams:
    """Every configured upstream by name; owns their sessions (see ``proxy.app``)."""

    def __init__(self, configs: Mapping[str, UpstreamConfig], **kwargs: Any) -> None:
        self.by_name = {name: Upstream(cfg, **kwargs) for name, cfg in configs.items()}

    def __getitem__(self, name: str) -> Upstream:
        return self.by_name[name]

    async def start(self) -> None:
        for upstream in self.by_name.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.by_name.values():
            await upstream.close()
