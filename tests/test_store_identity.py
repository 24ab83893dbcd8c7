"""Replicas that share one Redis but not one store: the misconfigured one refuses to start."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import redis

from tests.harness.proxyproc import REPO_ROOT, ProxyProcess
from tests.harness.redis import RedisServer
from tests.harness.registry import Registry

ProxyFactory = Callable[..., ProxyProcess]


def run_to_exit(proxy: ProxyProcess) -> subprocess.CompletedProcess[str]:
    """Run a proxy that is expected to stop by itself during start-up."""
    proxy.storage.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_PROXY": "127.0.0.1"}
    return subprocess.run(
        proxy.argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )


async def test_a_replica_on_another_store_refuses_to_share_redis(
    registry: Registry, proxy_factory: ProxyFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    args = ["--redis", redis_server.url]
    fleet = [proxy_factory(registry.url, storage=volume, extra_args=args) for _ in range(2)]
    store_id = (volume / "store-id").read_text().strip()
    with redis.Redis.from_url(redis_server.url) as client:
        record = json.loads(client.get("regproxy:store") or b"{}")
        assert 0 < client.pttl("regproxy:store") <= 60_000
    assert record["id"] == store_id and record["store"] == str(volume)

    other = tmp_path / "other-volume"
    result = run_to_exit(ProxyProcess(registry.url, other, extra_args=args))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "is not the store of" in x]
    assert f"store {other} (id " in line and f"{volume} (id {store_id}" in line
    assert all(p.running for p in fleet)

    # What the line advises works: another database of the same Redis.
    elsewhere = proxy_factory(
        registry.url, storage=other, extra_args=["--redis", redis_server.url[:-1] + "1"]
    )
    assert elsewhere.running
    assert (other / "store-id").read_text().strip() != store_id
