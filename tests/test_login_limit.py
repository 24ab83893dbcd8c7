"""Login throttling (``auth.login_limit``): repeated failed logins from one address get 429.

Real proxy processes with an htpasswd file; failures through ``/token`` (GET with Basic, POST
password grant) and Basic credentials on ``/v2/``; the fleet's count shared through Redis.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from proxy.access.auth import load_auth
from proxy.core.settings import ConfigError
from tests.harness.proxyproc import ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry
from tests.test_access import basic
from tests.test_read_path import error_code, fetch

ProxyFactory = Callable[..., ProxyProcess]
LOGIN = "service=regproxy&account=alice&client_id=docker&offline_token=true"


def write_config(directory: Path, failures: int, window: str) -> Path:
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u, p in (("alice", "alice-pw"), ("bob", "bob-pw"))
        )
    )
    config = directory / "regproxy.yml"
    config.write_text(
        f"""
auth:
  htpasswd: "{htpasswd}"
  token: {{signing_key_file: "{directory / "key"}"}}
  login_limit: {{failures: {failures}, window: {window}}}
  rules:
    - users: [anonymous, "*"]
      repositories: ["*"]
"""
    )
    (directory / "key").write_text("k" * 64)
    return config


async def login(proxy: ProxyProcess, user: str, password: str) -> tuple[int, dict[str, str], bytes]:
    """``docker login``'s request: ``GET /token`` without scope, Basic credentials."""
    status, headers, body = await fetch(f"{proxy.url}/token?{LOGIN}", headers=basic(user, password))
    return status, dict(headers), body


def throttled_total(metrics: bytes) -> float:
    for line in metrics.decode().splitlines():
        if line.startswith("regproxy_logins_throttled_total "):
            return float(line.split()[1])
    raise AssertionError("regproxy_logins_throttled_total missing")


async def test_failed_logins_are_throttled_and_good_ones_are_not(
    registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = write_config(tmp_path, failures=3, window="3s")
    proxy = proxy_factory(registry.url, extra_args=["--config", str(config)])

    # Successful logins are never counted: five of them, then two failures, still 401.
    for _ in range(5):
        assert (await login(proxy, "alice", "alice-pw"))[0] == 200
    assert (await login(proxy, "alice", "guess-1"))[0] == 401
    status, _, body = await fetch(f"{proxy.url}/v2/", headers=basic("bob", "guess-2"))
    assert status == 401 and error_code(body) == "UNAUTHORIZED"

    # The third failure (an unknown user's login check) reaches the limit; then 429.
    assert (await login(proxy, "mallory", "guess-3"))[0] == 401
    started = time.monotonic()
    status, headers, body = await login(proxy, "alice", "guess-4")
    assert status == 429 and error_code(body) == "TOOMANYREQUESTS"
    assert 1 <= int(headers["Retry-After"]) <= 3
    status, headers, body = await fetch(f"{proxy.url}/v2/", headers=basic("bob", "bob-pw"))
    assert status == 429 and "Retry-After" in headers  # not yet verified here: no password check
    form = "grant_type=password&username=bob&password=x&scope=repository:library/a:pull"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/token", data=form) as resp,
    ):
        assert resp.status == 429 and error_code(await resp.read()) == "TOOMANYREQUESTS"

    # Not slowed: the login that worked before, anonymous clients and tokens.
    assert (await login(proxy, "alice", "alice-pw"))[0] == 200
    status, _, _ = await fetch(f"{proxy.url}/token?service=regproxy&scope=repository:a/b:pull")
    assert status == 200

    status, _, metrics = await fetch(f"{proxy.url}/metrics")
    assert throttled_total(metrics) == 3

    # Once the window is over, a wrong password is an ordinary 401 again, a right one 200.
    await asyncio.sleep(max(0.0, 3.1 - (time.monotonic() - started)))
    assert (await login(proxy, "bob", "bob-pw"))[0] == 200
    assert (await login(proxy, "alice", "guess-5"))[0] == 401


async def test_the_fleet_counts_failures_together_with_redis(
    registry: Registry, proxy_factory: ProxyFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, failures=4, window="1m")
    args = ["--config", str(config), "--redis", redis_server.url]
    volume = tmp_path / "volume"
    a, b = (proxy_factory(registry.url, storage=volume, extra_args=args) for _ in range(2))
    for proxy, password in ((a, "x1"), (b, "x2"), (a, "x3"), (b, "x4")):
        assert (await login(proxy, "alice", password))[0] == 401
    for proxy in (a, b):
        status, headers, body = await login(proxy, "alice", "x5")
        assert status == 429 and error_code(body) == "TOOMANYREQUESTS"
        assert 50 <= int(headers["Retry-After"]) <= 60


async def test_the_workers_of_a_host_count_failures_together(
    registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Without Redis, four failures across two workers reach a limit of four: every login after
    them answers 429, whichever worker takes its connection (each request is a new one)."""
    config = write_config(tmp_path, failures=4, window="1m")
    proxy = proxy_factory(registry.url, extra_args=["--config", str(config)], workers=2)
    for password in ("x1", "x2", "x3", "x4"):
        assert (await login(proxy, "alice", password))[0] == 401
    for _ in range(8):
        status, headers, body = await login(proxy, "bob", "x5")
        assert status == 429 and error_code(body) == "TOOMANYREQUESTS"
        assert 50 <= int(headers["Retry-After"]) <= 60
    # both workers answered: the count is the host's, not one worker's
    line = re.compile(r" (w\d+) INFO proxy\.access request method=GET path=/token\?")
    answered = Counter[str]()
    for _ in range(50):  # a worker logs a request once its answer is sent
        answered = Counter(line.findall(proxy.logs()))
        if sum(answered.values()) == 12:
            break
        await asyncio.sleep(0.1)
    assert len(answered) == 2 and sum(answered.values()) == 12, answered


def test_login_limit_settings_are_checked() -> None:
    section = {"htpasswd": "/dev/null", "login_limit": {"failures": 5, "window": "30s"}}
    limit = load_auth(section).login_limit
    assert (limit.failures, limit.window) == (5, 30.0)
    assert load_auth({}).login_limit.failures == 10  # on by default
    for bad, key in (
        ({"failures": -1}, "auth.login_limit.failures"),
        ({"failures": "many"}, "auth.login_limit.failures"),
        ({"window": "soon"}, "auth.login_limit.window"),
        ({"window": "0s"}, "auth.login_limit.window"),
        ({"burst": 3}, "auth.login_limit.burst"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_auth({"login_limit": bad})
        assert caught.value.key == key
