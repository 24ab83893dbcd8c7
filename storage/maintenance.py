"""Maintenance of a store, stopped or in use: stats, purge, gc, verify.

Each works on any driver (a directory or a bucket prefix). It only reads objects, removes whole
objects (atomic on both backends: a reader that has a file open keeps it) and sets corrupt content
aside — moved to ``quarantine/`` on the filesystem, deleted on object storage. It never rewrites
an object in place.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.content import ContentStore, content_key, parse_tag

if TYPE_CHECKING:
    from storage.redis import RedisMetadata

#: Unreferenced blobs younger than this are left alone by gc (a pull may be between its
#: manifest and its blobs, or a client may fetch a blob by digest alone).
GC_MIN_AGE = 3600.0


async def _tag_digest(store: ContentStore, upstream: str, repository: str, tag: str) -> str | None:
    raw = await store.get_record(upstream, repository, "tags", tag)
    entry = parse_tag(raw) if raw is not None else None
    return entry.digest if entry is not None else None


async def _read_stats(store: ContentStore) -> list[dict[str, Any]]:
    results = []
    for name in sorted(await store.list_files("stats/")):
        if not name.endswith(".json"):
            continue
        raw = await store.get_file(name)
        try:
            doc = json.loads(raw or b"")
        except ValueError:
            continue
        if isinstance(doc, dict):
            results.append(doc)
    return results


async def stats(store: ContentStore, limit: int | None, top: int = 10) -> dict[str, Any]:
    """Size against limit, hit ratio, top repositories by stored bytes and by pulls."""
    files = await store.list_content()
    size_of = {f.digest: f.size for f in files}
    by_repo: dict[str, set[str]] = defaultdict(set)
    for record in await store.list_tags():
        digest = await _tag_digest(store, record.upstream, record.repository, record.tag)
        if digest:
            await store.reachable(digest, by_repo[f"{record.upstream}/{record.repository}"])
    stored = sorted(
        ((repo, sum(size_of.get(d, 0) for d in digests)) for repo, digests in by_repo.items()),
        key=lambda item: (-item[1], item[0]),
    )
    hits = misses = 0
    pulls: dict[str, int] = defaultdict(int)
    ratelimit: dict[str, Any] = {}
    for snapshot in await _read_stats(store):
        hits += int(snapshot.get("hits", 0))
        misses += int(snapshot.get("misses", 0))
        for repo, count in (snapshot.get("pulls") or {}).items():
            pulls[repo] += int(count)
        ratelimit.update(snapshot.get("ratelimit_remaining") or {})
    return {
        "storage": store.driver.location,
        "used_bytes": sum(size_of.values()),
        "limit_bytes": limit,
        "files": {
            "blobs": sum(f.kind == "blob" for f in files),
            "manifests": sum(f.kind == "manifest" for f in files),
        },
        "hit_ratio": hits / (hits + misses) if hits + misses else None,
        "hits": hits,
        "misses": misses,
        "top_by_bytes": [{"repository": r, "bytes": b} for r, b in stored[:top]],
        "top_by_pulls": [
            {"repository": r, "pulls": n}
            for r, n in sorted(pulls.items(), key=lambda i: (-i[1], i[0]))[:top]
        ],
        "upstream_ratelimit_remaining": ratelimit,
    }


@dataclass
class Freed:
    files: int = 0
    bytes: int = 0
    details: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    async def remove(self, store: ContentStore, what: str, key: str) -> None:
        info = await store.driver.stat(key)
        if info is None or not await store.driver.delete(key):
            return
        self.files += 1
        self.bytes += info.size
        self.details[what] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "details": dict(self.details)}


async def purge(
    store: ContentStore,
    upstream: str,
    repository: str,
    tag: str | None,
    redis: RedisMetadata | None = None,
) -> dict[str, Any]:
    """Forget a tag (or every tag of a repository) and the content only it referenced; with
    ``redis``, the fleet's records of them too (see ``RedisMetadata.purge``)."""
    records = await store.list_tags()
    doomed = [
        r
        for r in records
        if r.upstream == upstream and r.repository == repository and (tag is None or r.tag == tag)
    ]
    if not doomed:
        result: dict[str, Any] = {"tags": 0, **Freed().as_dict()}
        if redis is not None:  # a record the store lost, or a purge made without Redis
            result["redis_keys"] = await redis.purge(upstream, repository, tag, ())
        return result
    candidates: set[str] = set()
    keep: set[str] = set()
    for record in records:
        digest = await _tag_digest(store, record.upstream, record.repository, record.tag)
        if digest:
            await store.reachable(digest, candidates if record in doomed else keep)
    freed = Freed()
    base = f"repositories/{upstream}/{repository}/"
    for record in doomed:
        await freed.remove(store, "tag", f"{base}_tags/{record.tag}")
        await store.delete_tag(upstream, repository, record.tag)
    for kind in ("synth", "tagslist"):
        for key in await store.list_files(f"{base}_{kind}/"):
            if kind == "tagslist" or tag is None or key.rsplit("/", 1)[-1] == tag:
                await freed.remove(store, kind, key)
    for digest in sorted(candidates - keep):
        store.forget(digest)
        manifest = content_key("manifests", digest)
        await freed.remove(store, "manifest", manifest)
        await store.driver.delete(manifest + ".type")
        await freed.remove(store, "blob", content_key("blobs", digest))
    result = {"tags": len(doomed), **freed.as_dict()}
    if redis is not None:
        result["redis_keys"] = await redis.purge(upstream, repository, tag, candidates - keep)
    return result


async def gc(store: ContentStore, *, min_age: float = GC_MIN_AGE) -> dict[str, Any]:
    """Remove what a crash or an interrupted write left behind.

    Temp files of dead processes are removed (and their uploads aborted) at every start of a
    proxy; this removes half-written manifests and blobs no stored manifest references.
    """
    freed = Freed()
    for _, size in store.driver.leftovers:  # removed by open(), just before this
        freed.files += 1
        freed.bytes += size
        freed.details["temp"] += 1
    now = time.time()
    keys = {info.key: info async for info in store.driver.walk("manifests/")}
    for key, info in keys.items():
        if key.endswith(".type"):
            # written just before its manifest: give a running proxy's write time to finish
            if now - info.mtime >= 60 and key[: -len(".type")] not in keys:
                await freed.remove(store, "manifest-type", key)
        elif key + ".type" not in keys:
            await freed.remove(store, "manifest", key)
    files = await store.list_content()
    referenced: set[str] = set()
    for item in files:
        if item.kind == "manifest":
            await store.reachable(item.digest, referenced, depth=2)
    for item in files:
        if item.kind == "blob" and item.digest not in referenced and now - item.mtime > min_age:
            await freed.remove(store, "unreferenced-blob", content_key("blobs", item.digest))
    return freed.as_dict()


async def verify(
    store: ContentStore, *, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Re-hash every stored blob and manifest; set mismatches aside (see the module doc)."""
    files = await store.list_content()
    bad = []
    checked = 0
    for item in files:
        algorithm, _, hexpart = item.digest.partition(":")
        try:
            hasher = hashlib.new(algorithm)
        except ValueError:
            continue
        key = content_key("blobs" if item.kind == "blob" else "manifests", item.digest)
        stream = await store.driver.read(key)
        if stream is None:
            continue  # evicted meanwhile
        async for chunk in stream:
            hasher.update(chunk)
            if progress is not None:
                progress(len(chunk))
        checked += 1
        if hasher.hexdigest() != hexpart:
            store.forget(item.digest)
            where = await store.driver.quarantine(key, f"{item.kind}/{algorithm}-{hexpart}")
            if item.kind == "manifest":
                await store.driver.delete(key + ".type")
            bad.append({"kind": item.kind, "digest": item.digest, "quarantined": where})
    return {"checked": checked, "bytes": sum(f.size for f in files), "corrupt": bad}


async def total_bytes(store: ContentStore) -> int:
    return sum(f.size for f in await store.list_content())
