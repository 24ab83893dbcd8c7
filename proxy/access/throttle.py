"""Login throttling: too many failed logins from one client address answer 429 for a while.

A failed login is a known user's wrong password (Basic credentials on any request, ``/token``,
the console) or an unknown user's login check at ``/token`` (no scope: ``docker login``). Once an
address has ``failures`` of them within ``window``, every login from it that is not already known
good answers ``429 TOOMANYREQUESTS`` with ``Retry-After`` (the rest of the window), before any
password is checked::

    auth:
      login_limit:
        failures: 10        # failed logins per address and window; 0 turns throttling off
        window: 1m          # counted from the first failure

Not slowed: requests without credentials (anonymous), Bearer tokens, and credentials this
replica has verified in the last five minutes (a CI job whose login works keeps working even when
its address is throttled). An unknown user asking ``/token`` for scopes is not a failure either:
that is the Docker Hub login a Docker daemon sends to every mirror.

With Redis the counts are shared by the fleet (``SET NX PX`` and ``INCR`` in one transaction on
``regproxy:login-failures:<address>``); without it, or while it is away, each replica counts on
its own: the workers of a host together (``storage.host.HostWindows``), a single process in
memory. The address is the TCP peer's: behind a load balancer that is the balancer's own unless
it keeps client addresses (Kubernetes: ``externalTrafficPolicy: Local``, PROXY protocol ends
before regproxy), so give throttled clients their own way in or raise ``failures`` there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.core.errors import TooManyRequests
from proxy.core.settings import ConfigError, parse_duration
from storage.host import HostWindows
from storage.redis import key as redis_key

log = logging.getLogger(__name__)

LOGIN_LIMIT_KEYS = frozenset({"failures", "window"})
#: Addresses remembered in memory at most (oldest windows dropped first).
MAX_TRACKED = 10_000


@dataclass(frozen=True)
class LoginLimit:
    """The ``auth.login_limit`` section."""

    #: Failed logins from one address per window before it is throttled; 0: never throttled.
    failures: int = 10
    #: Seconds from an address's first failed login in which failures add up; defaults to 1m.
    window: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.failures > 0


def load_login_limit(section: object) -> LoginLimit:
    """``auth.login_limit`` -> LoginLimit; a bad value raises ConfigError naming its key."""
    if section is None:
        return LoginLimit()
    if not isinstance(section, Mapping):
        raise ConfigError("auth.login_limit", "must be a mapping with failures and window")
    unknown = set(section) - LOGIN_LIMIT_KEYS
    if unknown:
        raise ConfigError(f"auth.login_limit.{sorted(unknown)[0]}", "unknown setting")
    kwargs: dict[str, Any] = {}
    if section.get("failures") not in (None, ""):
        failures = section["failures"]
        if isinstance(failures, bool) or not str(failures).strip().isdigit():
            raise ConfigError("auth.login_limit.failures", f"{failures!r} is not a whole number")
        kwargs["failures"] = int(str(failures).strip())
    if section.get("window") not in (None, ""):
        try:
            window = parse_duration(section["window"])
        except ValueError as exc:
            raise ConfigError("auth.login_limit.window", str(exc)) from None
        if not 1 <= window <= 86400:
            raise ConfigError("auth.login_limit.window", "must be between 1s and 24h")
        kwargs["window"] = window
    return LoginLimit(**kwargs)


class LoginThrottle:
    """Counts failed logins per client address; see the module docstring."""

    def __init__(self, limit: LoginLimit) -> None:
        self.limit = limit
        #: Shared counts; set once Redis is connected (``proxy.app``). None: memory only.
        self.redis: aioredis.Redis | None = None
        #: The counts of this host's workers (``regproxy serve --workers N``); None: this process.
        self.host: HostWindows | None = None
        #: Called once per login answered 429 (metrics).
        self.on_throttled: Callable[[], None] = lambda: None
        self._local: dict[str, tuple[int, float]] = {}  # address -> (failures, window end)
        self._warned_at = 0.0

    async def check(self, client: str | None) -> None:
        """Raise TOOMANYREQUESTS (with Retry-After) if ``client`` may not try a login now."""
        if not self.limit.enabled or not client:
            return
        wait = await self._blocked_for(client)
        if wait is None:
            return
        self.on_throttled()
        log.warning("login throttled client=%s retry_after=%ds", client, wait)
        raise TooManyRequests(
            {"reason": "too many failed logins from this address"},
            message="too many failed logins",
            headers={"Retry-After": str(wait)},
        )

    async def failed(self, client: str | None) -> None:
        """Count a failed login of ``client``."""
        if not self.limit.enabled or not client:
            return
        if self.redis is not None:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    # the window starts with the first failure and is never extended
                    pipe.set(self._key(client), 0, nx=True, px=int(self.limit.window * 1000))
                    pipe.incr(self._key(client))
                    await pipe.execute()
                return
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_away(exc)
        if self.host is not None:
            self.host.add(client, self.limit.window)
            return
        now = time.monotonic()
        count, end = self._local.get(client, (0, 0.0))
        if end <= now:
            count, end = 0, now + self.limit.window
        self._local[client] = (count + 1, end)
        if len(self._local) > MAX_TRACKED:
            self._prune(now)

    async def _blocked_for(self, client: str) -> int | None:
        """Whole seconds until ``client`` may try again; None when it may now."""
        if self.redis is not None:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.get(self._key(client))
                    pipe.pttl(self._key(client))
                    raw, ttl_ms = await pipe.execute()
                if raw is not None and int(raw) >= self.limit.failures and ttl_ms > 0:
                    return max(1, math.ceil(int(ttl_ms) / 1000))
                return None
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                self._redis_away(exc)
        if self.host is not None:
            count, end = self.host.get(client)
        else:
            count, end = self._local.get(client, (0, 0.0))
        now = time.monotonic()
        if count >= self.limit.failures and end > now:
            return max(1, math.ceil(end - now))
        return None

    def _key(self, client: str) -> str:
        return redis_key("login-failures", client)

    def _prune(self, now: float) -> None:
        for client, (_, end) in list(self._local.items()):
            if end <= now:
                del self._local[client]
        while len(self._local) > MAX_TRACKED:  # all live: drop the windows that end first
            del self._local[min(self._local, key=lambda c: self._local[c][1])]

    def _redis_away(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at > 30:
            self._warned_at = now
            log.warning("redis unavailable, failed logins counted per replica error=%s", exc)
