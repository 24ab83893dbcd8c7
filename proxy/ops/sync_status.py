"""``regproxy sync status``: what a running proxy's scheduled sync did, and when it runs next."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from proxy.ops.commands import CommandError


async def fetch_status(proxy: str) -> dict[str, Any]:
    url = f"{proxy.rstrip('/')}/_regproxy/sync"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                raise CommandError(f"{url}: HTTP {resp.status}")
            result: dict[str, Any] = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CommandError(f"cannot reach the proxy: {exc}") from exc
    except ValueError as exc:
        raise CommandError(f"{url}: not a sync status document") from exc
    return result


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    delta = ts - now
    amount = abs(delta)
    text = (
        f"{amount:.0f}s"
        if amount < 120
        else f"{amount / 60:.0f}m"
        if amount < 7200
        else f"{amount / 3600:.1f}h"
    )
    return f"in {text}" if delta > 0 else f"{text} ago"


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "-"


def rows(status: dict[str, Any], now: float | None = None) -> list[tuple[str, ...]]:
    """One row per synced tag (one per entry with none yet): the table's cells, as text."""
    now = time.time() if now is None else now
    out: list[tuple[str, ...]] = []
    for entry in status.get("entries", []):
        platforms = entry["platforms"]
        common = (
            entry["repository"],
            ",".join(platforms) if isinstance(platforms, list) else str(platforms),
        )
        run = (
            f"{entry.get('last_result') or 'pending'}"
            + (f": {entry['error']}" if entry.get("error") else ""),
            _when(entry.get("last_run"), now),
            _when(entry.get("next_run"), now),
        )
        synced = entry.get("tags") or []
        if not synced:
            out.append((*common, ",".join(entry["tag_globs"]), "-", "-", *run))
        for tag in synced:
            digest = _short(tag.get("digest")) + (f" ({tag['error']})" if tag.get("error") else "")
            out.append((*common, tag["tag"], digest, _when(tag.get("synced_at"), now), *run))
    return out


HEADERS = ("REPOSITORY", "PLATFORMS", "TAG", "DIGEST", "SYNCED", "LAST RESULT", "LAST RUN", "NEXT")


def print_status(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"regproxy sync (floor {status.get('ratelimit_floor')})", box=None)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows(status):
        table.add_row(*row)
    Console(width=200 if not Console().is_terminal else None).print(table)
