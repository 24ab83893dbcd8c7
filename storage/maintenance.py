"""Offline-safe maintenance of a storage directory: stats, purge, gc, verify.

Each works on the directory of a stopped or a running proxy: it only reads files, removes whole
files (``unlink`` is atomic; a reader that has the file open keeps it) and moves corrupt files
aside with ``rename``. It never rewrites a file in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.eviction import _collect, scan
from storage.filesystem import FilesystemStorage, content_path

#: Unreferenced blobs younger than this are left alone by gc (a pull may be between its
#: manifest and its blobs, or a client may fetch a blob by digest alone).
GC_MIN_AGE = 3600.0


def tag_records(root: Path) -> Iterator[tuple[str, str, str, Path]]:
    """``(upstream, repository, tag, path)`` of every remembered tag."""
    repos = root / "repositories"
    if not repos.is_dir():
        return
    for path in repos.glob("**/_tags/*"):
        parts = path.relative_to(repos).parts
        yield parts[0], "/".join(parts[1:-2]), parts[-1], path


def _tag_digest(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reachable(root: Path, records: list[Path]) -> set[str]:
    """Digests of the manifests and blobs reachable from these tag records."""
    found: set[str] = set()
    for path in records:
        digest = _tag_digest(path)
        if digest:
            _collect(root, digest, found)
    return found


def _read_stats(root: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted((root / "stats").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            results.append(json.loads(path.read_text()))
    return results


def stats(root: Path, limit: int | None, top: int = 10) -> dict[str, Any]:
    """Size against limit, hit ratio, top repositories by stored bytes and by pulls."""
    files = scan(root)
    size_of = {f.digest: f.size for f in files}
    used = sum(size_of.values())
    by_repo: dict[str, set[str]] = defaultdict(set)
    for upstream, repository, _, path in tag_records(root):
        digest = _tag_digest(path)
        if digest:
            _collect(root, digest, by_repo[f"{upstream}/{repository}"])
    stored = sorted(
        ((repo, sum(size_of.get(d, 0) for d in digests)) for repo, digests in by_repo.items()),
        key=lambda item: (-item[1], item[0]),
    )
    hits = misses = 0
    pulls: dict[str, int] = defaultdict(int)
    ratelimit: dict[str, Any] = {}
    for snapshot in _read_stats(root):
        hits += int(snapshot.get("hits", 0))
        misses += int(snapshot.get("misses", 0))
        for repo, count in (snapshot.get("pulls") or {}).items():
            pulls[repo] += int(count)
        ratelimit.update(snapshot.get("ratelimit_remaining") or {})
    return {
        "used_bytes": used,
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

    def add(self, what: str, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.files += 1
        self.bytes += size
        self.details[what] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "details": dict(self.details)}


def purge(root: Path, upstream: str, repository: str, tag: str | None) -> dict[str, Any]:
    """Forget a tag (or every tag of a repository) and the content only it referenced."""
    records = list(tag_records(root))
    doomed = [
        p
        for u, r, t, p in records
        if u == upstream and r == repository and (tag is None or t == tag)
    ]
    if not doomed:
        return {"tags": 0, **Freed().as_dict()}
    candidates = reachable(root, doomed)
    keep = reachable(root, [p for *_, p in records if p not in set(doomed)])
    freed = Freed()
    for path in doomed:
        freed.add("tag", path)
    repo_dir = root / "repositories" / upstream / repository
    for kind in ("synth", "tagslist"):
        for path in (repo_dir / f"_{kind}").glob("*"):
            if kind == "tagslist" or tag is None or path.name == tag:
                freed.add(kind, path)
    for digest in sorted(candidates - keep):
        manifest = content_path(root, "manifests", digest)
        if manifest.exists():
            freed.add("manifest", manifest)
            with contextlib.suppress(FileNotFoundError):
                manifest.with_name(manifest.name + ".type").unlink()
        freed.add("blob", content_path(root, "blobs", digest))
    return {"tags": len(doomed), **freed.as_dict()}


def gc(root: Path, *, min_age: float = GC_MIN_AGE) -> dict[str, Any]:
    """Remove what a crash or an interrupted write left behind."""
    freed = Freed()
    # temp files of processes that are gone (a live process holds a lock on its directory)
    tmp = root / "tmp"
    if tmp.is_dir():
        for entry in tmp.iterdir():
            if entry.is_dir() and not FilesystemStorage._owned_by_live_process(entry):
                for path in entry.iterdir():
                    if path.name != ".lock":
                        freed.add("temp", path)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file():
                freed.add("temp", entry)
    # half-written manifests: bytes without a type or a type without bytes
    manifests = root / "manifests"
    if manifests.is_dir():
        for path in manifests.glob("*/*/*"):
            if path.name.endswith(".type"):
                # written just before its manifest: give a running proxy's write time to finish
                young = time.time() - path.stat().st_mtime < 60
                if not young and not path.with_name(path.name[: -len(".type")]).exists():
                    freed.add("manifest-type", path)
            elif not path.with_name(path.name + ".type").exists():
                freed.add("manifest", path)
    # blobs no stored manifest references
    referenced: set[str] = set()
    for item in scan(root):
        if item.kind == "manifest":
            _collect(root, item.digest, referenced, depth=2)
    now = time.time()
    for item in scan(root):
        if item.kind == "blob" and item.digest not in referenced and now - item.mtime > min_age:
            freed.add("unreferenced-blob", item.path)
    return freed.as_dict()


def verify(root: Path, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Re-hash every stored blob and manifest; move mismatches to ``quarantine/``."""
    files = scan(root)
    bad = []
    checked = 0
    for item in files:
        algorithm, _, hexpart = item.digest.partition(":")
        try:
            hasher = hashlib.new(algorithm)
        except ValueError:
            continue
        try:
            with open(item.path, "rb") as handle:
                while chunk := handle.read(1024 * 1024):
                    hasher.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except FileNotFoundError:
            continue  # evicted meanwhile
        checked += 1
        if hasher.hexdigest() != hexpart:
            target = root / "quarantine" / item.kind / f"{algorithm}-{hexpart}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(item.path, target)
            if item.kind == "manifest":
                with contextlib.suppress(FileNotFoundError):
                    item.path.with_name(item.path.name + ".type").unlink()
            bad.append({"kind": item.kind, "digest": item.digest, "quarantined": str(target)})
    return {"checked": checked, "bytes": sum(f.size for f in files), "corrupt": bad}


def total_bytes(root: Path) -> int:
    return sum(f.size for f in scan(root))
