"""``regproxy inspect`` and ``regproxy warm``: ask a running proxy over HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp

from proxy.core.media import ACCEPT_MANIFESTS, INDEX_TYPES
from proxy.core.reference import parse_image
from proxy.platforms.rules import Platform

DEFAULT_PROXY = "http://127.0.0.1:5000"


class CommandError(Exception):
    """A failure to report in one line, with a non-zero exit."""


async def _json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    try:
        async with session.get(url, **kwargs) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise CommandError(_error_text(resp.status, body))
            return json.loads(body)
    except aiohttp.ClientError as exc:
        raise CommandError(f"cannot reach the proxy: {exc}") from exc


def _error_text(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["errors"][0]
        detail = f" ({json.dumps(error['detail'])})" if error.get("detail") else ""
        return f"{status} {error['code']}: {error['message']}{detail}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {status}"


def _image_path(image: str) -> tuple[str, str]:
    ref = parse_image(image)
    return ref.repository, ref.reference


async def inspect(image: str, proxy: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        result: dict[str, Any] = await _json(
            session, f"{proxy.rstrip('/')}/_regproxy/inspect", params={"image": image}
        )
        return result


def print_inspect(result: dict[str, Any]) -> None:
    print(f"{result['image']}  {result['digest']}  {result['media_type']}")
    _print_platforms(result["platforms"], ("SIZE", "SOURCE"))


def signed_text(trust: dict[str, Any] | None) -> str:
    """One cell: whether a platform is signed, by which key (``inspect``, ``policy check``)."""
    if not trust or trust.get("rule") is None:
        return "-"
    if trust["rule"] != "require_signature":
        return f"{trust['rule']} (entry {trust['policy_entry']})"
    if trust.get("signed"):
        via = f" via index {trust['via'][:19]}" if trust.get("via") else ""
        return f"yes: {trust.get('key') or 'index'}{via}"
    return f"no: {trust.get('reason') or 'not signed'}"


def _print_platforms(platforms: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    signed = any("trust" in p for p in platforms)
    rows = [("PLATFORM", "DIGEST", *columns, *(("SIGNED",) if signed else ()))]
    for p in platforms:
        platform = p["platform"] + (" (attestation)" if p.get("attestation") else "")
        cells = {"SIZE": str(p.get("size") or "-"), "SOURCE": str(p.get("source"))}
        row = (platform, p["digest"], *(cells[c] for c in columns))
        rows.append((*row, signed_text(p.get("trust"))) if signed else row)
    last = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(last)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) if i < last else cell for i, cell in enumerate(row)))


async def policy_check(image: str, proxy: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        result: dict[str, Any] = await _json(
            session, f"{proxy.rstrip('/')}/_regproxy/policy/check", params={"image": image}
        )
        return result


def print_policy_check(result: dict[str, Any]) -> None:
    entry = result.get("policy_entry")
    verdict = "allowed" if result["allowed"] else "REFUSED"
    rule = f"policy entry {entry}" if entry else "no policy entry matches"
    print(f"{result['image']}  {result['digest']}  {verdict} ({rule})")
    if result.get("message"):
        print(f"  {result['message']}")
    if result.get("platforms"):
        _print_platforms(result["platforms"], ("SOURCE",))


def _wanted(platforms: str) -> set[Platform] | None:
    if platforms.strip() == "all":
        return None
    return {Platform.parse(p) for p in platforms.split(",") if p.strip()}


async def warm(
    images: Sequence[str], proxy: str, platforms: str, *, progress: bool = True
) -> dict[str, int]:
    """Pull manifests and blobs of ``platforms`` through the proxy; return counts."""
    wanted = _wanted(platforms)
    base = proxy.rstrip("/")
    totals = {"manifests": 0, "blobs": 0, "bytes": 0}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        work: list[tuple[str, str, int]] = []  # (repository, digest, size)
        for image in images:
            repository, reference = _image_path(image)
            top = await _manifest(session, base, repository, reference)
            totals["manifests"] += 1
            children = [top]
            if top["mediaType"] in INDEX_TYPES:
                children = []
                for desc in top["manifests"]:
                    platform = Platform.from_json(desc.get("platform"))
                    if platform is None or platform.unknown:
                        continue
                    if wanted is None or platform in wanted:
                        children.append(await _manifest(session, base, repository, desc["digest"]))
                        totals["manifests"] += 1
                if not children:
                    raise CommandError(f"{image}: no manifest for {platforms}")
            for child in children:
                for blob in [child.get("config") or {}, *(child.get("layers") or [])]:
                    if blob.get("digest"):
                        work.append((repository, blob["digest"], int(blob.get("size") or 0)))
        await _fetch_blobs(session, base, work, totals, progress=progress)
    return totals


async def _manifest(
    session: aiohttp.ClientSession, base: str, repository: str, reference: str
) -> dict[str, Any]:
    url = f"{base}/v2/{repository}/manifests/{reference}"
    doc: dict[str, Any] = await _json(session, url, headers={"Accept": ACCEPT_MANIFESTS})
    return doc


async def _fetch_blobs(
    session: aiohttp.ClientSession,
    base: str,
    work: list[tuple[str, str, int]],
    totals: dict[str, int],
    *,
    progress: bool,
) -> None:
    unique = list({digest: (repo, digest, size) for repo, digest, size in work}.values())
    bar = progress_bar(sum(size for _, _, size in unique), "warming") if progress else None
    semaphore = asyncio.Semaphore(4)

    async def one(repository: str, digest: str) -> None:
        async with semaphore:
            url = f"{base}/v2/{repository}/blobs/{digest}"
            try:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        raise CommandError(
                            f"{digest}: {_error_text(resp.status, await resp.read())}"
                        )
                    async for chunk in resp.content.iter_chunked(256 * 1024):
                        totals["bytes"] += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            except aiohttp.ClientError as exc:
                raise CommandError(f"{digest}: download failed: {exc}") from exc
            totals["blobs"] += 1

    try:
        await asyncio.gather(*(one(repo, digest) for repo, digest, _ in unique))
    finally:
        if bar is not None:
            bar.close()


class _Bar:
    def __init__(self, total: int, description: str) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def update(self, n: int) -> None:
        self._progress.update(self._task, advance=n)

    def close(self) -> None:
        self._progress.stop()


def progress_bar(total: int, description: str) -> _Bar | None:
    """A progress bar on a terminal; None when output goes elsewhere."""
    if not sys.stderr.isatty():
        return None
    try:
        return _Bar(total, description)
    except ImportError:  # rich is optional: no bar, same work
        return None
