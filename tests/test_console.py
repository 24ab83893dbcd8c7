"""The operator's console (``/_regproxy/``): its JSON against /metrics and known pulls, the page
in Debian's headless Chromium (figures, 1280x800 and phone screenshots, labels, contrast), who
may open it, and the Grafana dashboard's queries against the metrics regproxy exports.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.metrics import UsageStats
from storage import WorkSettings, create_store
from tests.harness.browser import Browser
from tests.harness.front import Drip, Front, blob, manifest, too_many_requests
from tests.harness.images import SeededImage, SeededRegistry
from tests.harness.proxyproc import ProxyProcess
from tests.test_access import basic
from tests.test_faults import settled
from tests.test_read_path import ACCEPT

ProxyFactory = Callable[..., ProxyProcess]
FrontFactory = Callable[..., Front]
REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "charts" / "regproxy" / "dashboards" / "regproxy.json"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Pulled:
    """What a client received: body bytes per repository, tag pulls, requests, digests."""

    bytes: dict[str, int] = field(default_factory=dict)
    pulls: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    digests: set[str] = field(default_factory=set)
    #: Requests of the pulls that found everything cached (the cache hits).
    warm_requests: int = 0


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(url, headers={"Accept": ACCEPT, **(headers or {})}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def api(proxy: ProxyProcess, path: str, headers: dict[str, str] | None = None) -> Any:
    status, _, body = await get(f"{proxy.url}/_regproxy/api/{path}", headers)
    assert status == 200, body
    return json.loads(body)


async def metrics(proxy: ProxyProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _, body = await get(f"{proxy.url}/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> int:
    want = set(labels.items())
    return int(sum(v for (n, lab), v in samples.items() if n == name and want <= lab))


async def pull(
    proxy: ProxyProcess,
    image: SeededImage,
    platform: str,
    into: Pulled,
    headers: dict[str, str] | None = None,
) -> None:
    """Pull one platform of ``image`` over HTTP like a client: tag, child, config, layers."""
    repo = f"docker.io/{image.repository}"
    base = f"{proxy.url}/v2/{image.repository}"

    async def fetch(path: str) -> bytes:
        status, _, body = await get(f"{base}/{path}", headers)
        assert status == 200, (path, body[:300])
        into.bytes[repo] = into.bytes.get(repo, 0) + len(body)
        into.requests += 1
        return body

    await fetch(f"manifests/{image.tag}")
    into.pulls[repo] = into.pulls.get(repo, 0) + 1
    child = image.child(platform)
    into.digests.add(image.digest)
    if child.digest != image.digest:
        await fetch(f"manifests/{child.digest}")
        into.digests.add(child.digest)
    for digest in (child.config_digest, *child.layers):
        assert await fetch(f"blobs/{digest}") == image.blobs[digest]
        into.digests.add(digest)


def write_config(directory: Path, text: str) -> list[str]:
    path = directory / "regproxy.yml"
    path.write_text(text)
    return ["--config", str(path)]


BASE_CONFIG = """
console: {sample_every: 1s, history: 1h}
cache: {max_size: 50MB, pin: ["library/alpine:*"]}
"""


async def served_proxy(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> tuple[Front, ProxyProcess, Pulled]:
    """A proxy that served known traffic: alpine amd64 twice, busybox arm64, hello."""
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=write_config(tmp_path, BASE_CONFIG))
    pulled = Pulled()
    await pull(proxy, seeded_registry["library/alpine:3.19"], "linux/amd64", pulled)
    first_pass = pulled.requests
    await pull(proxy, seeded_registry["library/alpine:3.19"], "linux/amd64", pulled)
    assert pulled.requests == 2 * first_pass
    pulled.warm_requests = first_pass
    await pull(proxy, seeded_registry["library/busybox:1.36"], "linux/arm64/v8", pulled)
    await pull(proxy, seeded_registry["library/hello:latest"], "linux/amd64", pulled)
    settled(proxy.storage)  # every blob published (clients finish a moment before)
    return upstream, proxy, pulled


async def wait_for(check: Callable[[], Any], within: float = 15.0) -> Any:
    """Poll the async ``check`` until it returns something truthy (bounded)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.2)


# -- the JSON ----------------------------------------------------------------------------------


async def test_api_figures_match_metrics_and_known_pulls(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    upstream, proxy, pulled = await served_proxy(seeded_registry, front, proxy_factory, tmp_path)
    summary = await api(proxy, "summary")
    m = await metrics(proxy)

    traffic = summary["traffic"]
    hits = total(m, "regproxy_cache_hits_total")
    misses = total(m, "regproxy_cache_misses_total")
    assert (traffic["hits"], traffic["misses"]) == (hits, misses)
    # The second alpine pull was all hits; everything else a miss.
    assert (hits, misses) == (pulled.warm_requests, pulled.requests - pulled.warm_requests)
    assert traffic["hit_ratio"] == round(hits / (hits + misses), 4)
    assert traffic["bytes_from_cache"] == total(
        m, "regproxy_cache_served_bytes_total", source="cache"
    )
    assert traffic["bytes_from_upstream"] == total(
        m, "regproxy_cache_served_bytes_total", source="upstream"
    )
    assert traffic["bytes_from_cache"] + traffic["bytes_from_upstream"] == sum(
        pulled.bytes.values()
    )
    assert traffic["upstream_requests_saved"] == hits
    assert traffic["upstream_requests"] == total(m, "regproxy_upstream_requests_total")
    assert traffic["upstream_requests"] == len(upstream.requests)

    storage = summary["storage"]
    assert storage["used_bytes"] == total(m, "regproxy_storage_bytes") > 0
    assert storage["limit_bytes"] == total(m, "regproxy_storage_limit_bytes") == 50_000_000
    assert storage["high_watermark_bytes"] == 47_500_000
    assert storage["low_watermark_bytes"] == 42_500_000

    by_bytes = {r["repository"]: r for r in summary["top_repositories"]["by_bytes"]}
    by_pulls = {r["repository"]: r for r in summary["top_repositories"]["by_pulls"]}
    assert {r: v["bytes"] for r, v in by_bytes.items()} == pulled.bytes
    assert {r: v["pulls"] for r, v in by_pulls.items()} == pulled.pulls
    ordered = [r["repository"] for r in summary["top_repositories"]["by_bytes"]]
    assert ordered == sorted(pulled.bytes, key=lambda r: -pulled.bytes[r])

    fleet = summary["fleet"]  # one replica: its live figures
    assert (fleet["replicas"], fleet["hits"], fleet["misses"]) == (1, hits, misses)
    assert {r["repository"]: r["pulls"] for r in fleet["top_pulls"]} == pulled.pulls
    other = UsageStats(name="replica-b")  # another replica's saved figures
    other.hits, other.misses = 5, 2
    other.pulls.update({"docker.io/library/alpine": 3, "docker.io/library/nginx": 1})
    store = create_store(proxy.storage, None, WorkSettings())
    await store.open()
    await other.save(store)
    await store.close()
    fleet = (await api(proxy, "summary"))["fleet"]
    assert (fleet["replicas"], fleet["hits"], fleet["misses"]) == (2, hits + 5, misses + 2)
    fleet_pulls = {r["repository"]: r["pulls"] for r in fleet["top_pulls"]}
    assert fleet_pulls["docker.io/library/alpine"] == pulled.pulls["docker.io/library/alpine"] + 3
    assert fleet_pulls["docker.io/library/nginx"] == 1

    [hub] = summary["upstreams"]
    assert hub["name"] == "docker.io" and hub["health"] == "ok" and hub["last_error"] is None
    assert hub["requests"] == len(upstream.requests)
    assert summary["downloads"] == []
    assert summary["pinned"] == ["library/alpine:*"]
    assert summary["replica"]["hostname"] == socket.gethostname()
    assert re.fullmatch(r"[0-9a-f]{12}", summary["replica"]["instance"])

    async def history_caught_up() -> Any:
        history = await api(proxy, "history")
        samples = history["samples"]
        return len(samples) >= 3 and samples[-1]["used_bytes"] == storage["used_bytes"] and history

    history = await wait_for(history_caught_up)
    assert history["sample_every_seconds"] == 1.0
    times = [s["at"] for s in history["samples"]]
    assert times == sorted(times)

    alpine = seeded_registry["library/alpine:3.19"]
    inspected = await api(proxy, "inspect?image=alpine:3.19")
    assert inspected["image"] == "docker.io/library/alpine:3.19"
    assert inspected["digest"] == alpine.digest
    rows = {r["platform"]: r for r in inspected["platforms"]}
    assert set(rows) == {"linux/amd64", "linux/arm64/v8", "linux/arm/v7"}
    amd64 = alpine.child("linux/amd64")
    assert rows["linux/amd64"]["cached"] == "yes"
    blobs_size = sum(len(alpine.blobs[d]) for d in (amd64.config_digest, *amd64.layers))
    assert rows["linux/amd64"]["image_bytes"] == rows["linux/amd64"]["cached_bytes"] == blobs_size
    assert rows["linux/arm64/v8"]["cached"] == "no"


async def test_downloads_in_flight_and_upstream_rate_limit(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=write_config(tmp_path, BASE_CONFIG))
    redis = seeded_registry["library/redis:7"]
    big = max(redis.child("linux/amd64").layers, key=lambda d: len(redis.blobs[d]))
    size = len(redis.blobs[big])
    upstream.add_fault(blob(big, "GET"), Drip(size // 4))  # about four seconds
    client = asyncio.create_task(get(f"{proxy.url}/v2/library/redis/blobs/{big}"))
    try:

        async def moving() -> Any:
            rows = (await api(proxy, "summary"))["downloads"]
            row = next((r for r in rows if r["digest"] == big), None)
            ok = row and 0 < row["written"] < size and row["rate_bytes_per_second"] > 0
            return ok and row

        row = await wait_for(moving, within=20)
        async with Browser(tmp_path) as browser:
            await browser.open(
                f"{proxy.url}/_regproxy/",
                ready="document.querySelector('#downloads tbody tr[data-digest]')",
            )
            shown = await browser.eval(
                "(() => { const tr = document.querySelector('#downloads tbody tr[data-digest]');"
                " return {digest: tr.dataset.digest, repo: tr.cells[0].textContent,"
                " progress: Number(tr.querySelector('progress').value),"
                " max: Number(tr.querySelector('progress').max), text: tr.innerText}; })()"
            )
        assert shown["digest"] == big and shown["repo"] == "docker.io/library/redis"
        assert shown["max"] == size and 0 < shown["progress"] < size
        assert "/s" in shown["text"] and f"of {size / 1024:.1f} KiB" in shown["text"]
        assert row["size"] == size
        assert (row["upstream"], row["repository"]) == ("docker.io", "library/redis")
        assert 0 < row["progress"] < 1
        assert row["rate_bytes_per_second"] < 4 * size  # the drip is a quarter of it a second
        status, _, body = await client
        assert status == 200 and body == redis.blobs[big]
    finally:
        client.cancel()

    # The client has its verified last byte a moment before the blob is fsynced and renamed:
    # the download is listed until then.
    async def listed_none() -> bool:
        return bool((await api(proxy, "summary"))["downloads"] == [])

    assert await wait_for(listed_none, within=5)

    upstream.add_fault(manifest("5.7", "GET"), too_many_requests(retry_after=120), times=10)
    upstream.add_fault(manifest("5.7", "HEAD"), too_many_requests(retry_after=120), times=10)
    status, _, _ = await get(f"{proxy.url}/v2/library/mysql/manifests/5.7")
    assert status == 429
    [hub] = (await api(proxy, "summary"))["upstreams"]
    assert hub["health"] == "rate-limited"
    assert hub["last_error"].startswith("HTTP 429")
    assert 100 < hub["ratelimit_reset_seconds"] <= 120


async def test_recently_evicted_lists_what_eviction_removed(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    upstream = front(seeded_registry.registry)
    config = "console: {sample_every: 1s}\ncache: {max_size: 72KB}\n"
    proxy = proxy_factory(upstream.url, extra_args=write_config(tmp_path, config))
    pulled = Pulled()
    await pull(proxy, seeded_registry["library/redis:7"], "linux/amd64", pulled)  # ~68 KB
    for ref, platform in (
        ("library/alpine:3.19", "linux/amd64"),
        ("library/busybox:1.36", "linux/amd64"),
        ("library/hello:latest", "linux/amd64"),
    ):
        await pull(proxy, seeded_registry[ref], platform, pulled)

    async def evicted() -> Any:
        summary = await api(proxy, "summary")
        return summary["evicted"]["recent"] and summary

    summary = await wait_for(evicted)
    m = await metrics(proxy)
    recent = summary["evicted"]["recent"]
    assert summary["evicted"]["total"]["blob"] == total(m, "regproxy_evictions_total", kind="blob")
    assert len(recent) == total(m, "regproxy_evictions_total")
    assert {e["digest"] for e in recent} <= pulled.digests
    assert all(e["kind"] in ("blob", "manifest") and e["size"] > 0 for e in recent)
    assert summary["storage"]["used_bytes"] <= 72_000 * 0.95
    assert summary["evicted"]["tracked"] is True


# -- access ------------------------------------------------------------------------------------


async def test_only_admins_open_the_console_and_see_only_what_they_may_pull(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u, p in USERS.items()
        )
    )
    config = f"""
auth:
  htpasswd: "{htpasswd}"
  admins: [alice, carol]
  rules:
    - users: [alice]
      repositories: ["*"]
    - users: [bob, carol]
      repositories: ["docker.io/library/*"]
"""
    upstream = front(seeded_registry.registry)
    proxy = proxy_factory(upstream.url, extra_args=write_config(tmp_path, config))
    alice, bob, carol = (basic(u, USERS[u]) for u in ("alice", "bob", "carol"))
    pulled = Pulled()
    await pull(proxy, seeded_registry["myteam/app:1.0-amd64"], "linux/amd64", pulled, alice)
    await pull(proxy, seeded_registry["library/hello:latest"], "linux/amd64", pulled, bob)

    paths = ["", "static/console.js", "api/summary", "api/history", "api/inspect?image=hello"]
    for path in paths:
        url = f"{proxy.url}/_regproxy/{path}"
        status, headers, body = await get(url)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic ")
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        status, _, body = await get(url, basic("alice", "wrong"))
        assert status == 401, path
        status, _, body = await get(url, bob)
        assert status == 403, path
        assert json.loads(body)["errors"][0]["code"] == "DENIED"
        status, _, body = await get(url, alice)
        assert status == 200, (path, body[:200])

    status, _, body = await get(f"{proxy.url}/_regproxy/api/summary", alice)
    text = body.decode()
    assert "docker.io/myteam/app" in text
    assert not any(p in text for p in USERS.values()) and str(htpasswd) not in text
    status, _, body = await get(f"{proxy.url}/_regproxy/api/summary", carol)
    assert status == 200
    assert "myteam" not in body.decode()  # carol may not pull it: she never learns its name
    tops = json.loads(body)["top_repositories"]
    assert [r["repository"] for r in tops["by_pulls"]] == ["docker.io/library/hello"]
    status, _, body = await get(
        f"{proxy.url}/_regproxy/api/inspect?image=myteam/app:1.0-amd64", carol
    )
    assert status == 403

    # The page itself, as the admin's browser sends her credentials with every request.
    async with Browser(tmp_path) as browser:
        loaded = "document.body.dataset.loaded === 'true'"
        await browser.open(f"{proxy.url}/_regproxy/", headers=carol, ready=loaded)
        text = await browser.eval("document.body.innerText")
        assert "docker.io/library/hello" in text and "myteam" not in text
        assert browser.console_errors == []


def test_console_settings_are_validated() -> None:
    from proxy.access.auth import load_auth
    from proxy.config import ConfigError, load_config

    config = load_config(environ={"REGPROXY_CONSOLE_SAMPLE_EVERY": "10s"})
    assert config.console.sample_every == 10.0 and config.console.history == 6 * 3600
    for key, value in (("sample_every", "soon"), ("history", "0s"), ("window", "1h")):
        with pytest.raises(ConfigError) as caught:
            load_config(environ={}, flags={f"console.{key}": value})
        assert caught.value.key == f"console.{key}"
    assert load_auth({"htpasswd": "/x", "admins": ["alice"]}).admins == ("alice",)
    with pytest.raises(ConfigError) as caught:
        load_auth({"admins": {"alice": True}})
    assert caught.value.key == "auth.admins"


# -- the page in a real browser ----------------------------------------------------------------

#: Every visible text's colour against its effective background: WCAG contrast ratios.
CONTRAST_JS = r"""
(() => {
  const rgb = (s) => (s.match(/[\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const worst = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || !el || !el.getClientRects().length) continue;
    if (el.closest(".sr-only, svg, meter, progress")) continue;
    const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) worst.push([n.textContent.trim().slice(0, 40), ratio]);
  }
  return worst;
})()
"""

#: Form controls, meters, tables and charts without an accessible name.
LABELS_JS = r"""
(() => {
  const missing = [];
  for (const el of document.querySelectorAll("input, button, meter, progress, select, textarea")) {
    const named = (el.labels && el.labels.length) || el.getAttribute("aria-label") ||
      (el.tagName === "BUTTON" && el.textContent.trim());
    if (!named) missing.push(el.outerHTML.slice(0, 80));
  }
  for (const t of document.querySelectorAll("table")) {
    if (!t.caption && !t.getAttribute("aria-label")) missing.push("table#" + t.id);
  }
  for (const s of document.querySelectorAll("svg[role=img]")) {
    if (!s.querySelector("title") || !s.querySelector("title").textContent) missing.push("svg");
  }
  if (!document.documentElement.lang) missing.push("html lang");
  return missing;
})()
"""

FIGURES_JS = r"""
(() => {
  const v = (id) => document.getElementById(id).getAttribute("data-value");
  const rows = (id) => [...document.querySelectorAll("#" + id + " tbody tr[data-repository]")]
    .map((tr) => [tr.dataset.repository,
                  ...[...tr.cells].slice(1).map((c) => Number(c.dataset.value))]);
  return {
    used: v("storage-used"), limit: v("storage-limit"), ratio: v("hit-ratio"),
    cache: v("bytes-cache"), upstream: v("bytes-upstream"), saved: v("requests-saved"),
    upstreams: [...document.querySelectorAll("#upstreams tbody tr")]
      .map((tr) => tr.dataset.upstream),
    health: document.querySelector("#upstreams tbody tr td:nth-child(2)").dataset.value,
    byBytes: rows("top-bytes"), byPulls: rows("top-pulls"),
    pinned: [...document.querySelectorAll("#pinned li[data-value]")].map((li) => li.dataset.value),
    samples: Number(document.getElementById("history-chart").dataset.samples),
    text: document.body.innerText,
  };
})()
"""


async def test_page_in_chromium_shows_the_figures(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    upstream, proxy, pulled = await served_proxy(seeded_registry, front, proxy_factory, tmp_path)
    page = f"{proxy.url}/_regproxy/"
    loaded = "document.body.dataset.loaded === 'true'"
    async with Browser(tmp_path) as browser:
        await browser.open(page, width=1280, height=800, ready=loaded)
        shown = await browser.eval(FIGURES_JS)
        m = await metrics(proxy)
        hits = total(m, "regproxy_cache_hits_total")
        misses = total(m, "regproxy_cache_misses_total")
        assert float(shown["ratio"]) == round(hits / (hits + misses), 4)
        assert f"{hits / (hits + misses) * 100:.1f} %" in shown["text"]
        assert int(shown["cache"]) == total(m, "regproxy_cache_served_bytes_total", source="cache")
        assert int(shown["upstream"]) == total(
            m, "regproxy_cache_served_bytes_total", source="upstream"
        )
        assert int(shown["saved"]) == hits
        assert int(shown["used"]) == total(m, "regproxy_storage_bytes")
        assert int(shown["limit"]) == 50_000_000
        assert shown["upstreams"] == ["docker.io"] and shown["health"] == "ok"
        assert {r[0]: r[1] for r in shown["byBytes"]} == pulled.bytes
        assert {r[0]: r[1] for r in shown["byPulls"]} == pulled.pulls
        assert shown["pinned"] == ["library/alpine:*"]
        assert shown["samples"] >= 1
        assert await browser.eval(LABELS_JS) == []
        assert await browser.eval(CONTRAST_JS) == []
        desktop = await browser.screenshot(tmp_path / "console-1280x800.png")

        # The search box: an image reference -> its platforms, cached or not.
        await browser.eval(
            "document.getElementById('inspect-image').value = 'library/alpine:3.19';"
            "document.getElementById('inspect-form').requestSubmit()"
        )
        await browser.wait_for(
            "document.querySelectorAll('#inspect tbody tr[data-platform]').length"
        )
        cached = await browser.eval(
            "Object.fromEntries([...document.querySelectorAll('#inspect tbody tr')]"
            ".map((tr) => [tr.dataset.platform, tr.cells[5].dataset.value]))"
        )
        assert cached == {"linux/amd64": "yes", "linux/arm64/v8": "no", "linux/arm/v7": "no"}
        await browser.screenshot(tmp_path / "console-1280-full.png", full_page=True)

        await browser.open(page, width=390, height=844, mobile=True, ready=loaded)
        widths = await browser.eval(
            "({page: document.documentElement.scrollWidth, view: window.innerWidth})"
        )
        assert widths["page"] <= widths["view"], widths  # no sideways scrolling on a phone
        assert await browser.eval(CONTRAST_JS) == []
        phone = await browser.screenshot(tmp_path / "console-390x844.png", full_page=True)
        assert browser.console_errors == []
    for shot in (desktop, phone):
        assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000


# -- the Grafana dashboard -----------------------------------------------------------------------


def dashboard_exprs(doc: Any) -> list[str]:
    if isinstance(doc, dict):
        found = [doc["expr"]] if isinstance(doc.get("expr"), str) else []
        for value in doc.values():
            found += dashboard_exprs(value)
        return found
    if isinstance(doc, list):
        return [e for item in doc for e in dashboard_exprs(item)]
    return []


#: PromQL words that are not metric names (functions, aggregations, keywords).
PROMQL_WORDS = frozenset(
    {
        *("sum", "avg", "max", "min", "count", "topk", "bottomk", "by", "without", "on"),
        *("rate", "irate", "increase", "delta", "deriv", "abs", "histogram_quantile"),
        *("clamp_min", "clamp_max", "label_replace", "vector", "scalar", "time"),
        *("and", "or", "unless", "offset", "bool", "ignoring", "group_left", "group_right"),
    }
)


async def test_dashboard_queries_use_exported_metrics(
    seeded_registry: SeededRegistry,
    front: FrontFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(doc)
    assert len(exprs) >= 8
    _, proxy, _ = await served_proxy(seeded_registry, front, proxy_factory, tmp_path)
    status, _, body = await get(f"{proxy.url}/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(body.decode()))
    exported = {s.name for f in families for s in f.samples}
    # A labelled metric is declared (HELP/TYPE) before its first series: the Docker Hub rate
    # limit needs an upstream that sends ratelimit headers (the test registry does not), storage
    # errors need a failing disk. Their series names follow from the declared type.
    suffixes = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported |= {f.name + end for f in families for end in suffixes.get(f.type, ())}
    assert "regproxy_cache_hits_total" in exported
    for expr in exprs:
        without_labels = re.sub(
            r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr
        )
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)) - PROMQL_WORDS
        names = {n for n in names if not re.fullmatch(r"[a-z]", n)}
        assert names, expr
        assert names <= exported, (expr, names - exported)


def test_dashboard_ships_in_the_chart_as_a_grafana_configmap(tmp_path: Path) -> None:
    from tests.test_chart import helm_binary, render, validate_object

    helm = helm_binary()
    for sub in ("off", "on"):
        (tmp_path / sub).mkdir()
    plain = render(helm, tmp_path / "off")
    assert not [d for d in plain.docs if "grafana_dashboard" in d["metadata"].get("labels", {})]
    rendered = render(helm, tmp_path / "on", overrides={"dashboards": {"enabled": True}})
    [cm] = [d for d in rendered.docs if "grafana_dashboard" in d["metadata"].get("labels", {})]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["regproxy.json"]) == json.loads(DASHBOARD.read_text())
    validate_object(cm, "1.25.0")
    assert yaml.safe_dump(cm)  # plain data, renders back


async def test_a_download_cut_short_counts_no_bytes(
    registry: Any, front: FrontFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Headers and part of a blob went out, then upstream broke for good: the client got no
    blob, so neither the console's bytes per repository nor served_bytes count it."""
    from tests.harness.images import seed_image
    from tests.test_faults import CutAfter, blob_get, request

    image = seed_image(
        registry, "library/cut", "1", platforms=("linux/amd64",), layer_sizes=(1024 * 1024,)
    )
    digest = image.child("linux/amd64").layers[0]
    data = image.blobs[digest]
    upstream = front(registry)
    upstream.add_fault(blob_get(digest, ranged=False), CutAfter(200_000))
    upstream.add_fault(blob_get(digest, ranged=True), CutAfter(0), times=100)
    proxy = proxy_factory(upstream.url, extra_args=write_config(tmp_path, BASE_CONFIG))
    url = f"{proxy.url}/v2/library/cut/blobs/{digest}"

    cut = await request(url)
    assert cut.cut and len(cut.body) < len(data), cut

    async def counted() -> tuple[int, int]:
        """(console bytes of library/cut, regproxy_cache_served_bytes_total)"""
        summary = await api(proxy, "summary")
        by_bytes = {r["repository"]: r["bytes"] for r in summary["top_repositories"]["by_bytes"]}
        served = total(await metrics(proxy), "regproxy_cache_served_bytes_total")
        return by_bytes.get("docker.io/library/cut", 0), served

    # the access logger counts, once the handler returned
    await wait_for(lambda: asyncio.sleep(0, "cache=ABORTED" in proxy.logs()), within=5)
    assert await counted() == (0, 0)

    # the same counters do count a whole one (so the zero above is not a counter that is off)
    upstream.clear_faults()
    whole = await request(url)
    assert (whole.status, whole.error, whole.body) == (200, None, data)

    async def whole_counted() -> bool:
        return await counted() == (len(data), len(data))

    await wait_for(whole_counted, within=5)
