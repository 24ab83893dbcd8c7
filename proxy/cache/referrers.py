"""The OCI 1.1 referrers API: signatures, SBOMs and attestations that name a manifest.

``GET /v2/<name>/referrers/<digest>[?artifactType=T]`` answers an OCI image index whose
``manifests`` are the descriptors of the manifests whose ``subject`` is ``<digest>``::

    cached answer younger than the tag TTL ──────────────────────────────► served (HIT)
    else upstream GET /v2/<name>/referrers/<digest>  (always unfiltered)
        200 ─────────────── the index, byte for byte ─────────────────────► remembered, served
        404 (no referrers API: distribution 2.8, older registries)
            └─ the fallback tag sha256-<hex> (an index of referrers) ─────► its descriptors
               or, when that tag does not exist either ───────────────────► an empty index
        refused / 5xx / 429, with an answer remembered ──────────────────► served (STALE)

Upstream is always asked for the whole list, so one record serves every ``artifactType``
filter: the filter is applied here and announced with ``OCI-Filters-Applied: artifactType``.
An unfiltered answer from upstream's API passes through unchanged; a filtered or built one is
serialized here (compact JSON). Answers are records of the metadata store (``kind
"referrers"``), shared by replicas through Redis like tag answers.

The referrer manifests themselves and their blobs are ordinary content of the subject's
repository: they are fetched and checked through the manifest and blob paths, under the same
access rules. Limits: a paginated upstream answer (``Link: rel="next"``) is followed for at most
``MAX_PAGES`` pages; of a fallback tag's descriptors that lack ``artifactType``, the first
``MAX_COMPLETED`` are completed from their manifests (fetched and cached), the rest pass as
they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proxy.cache.manifests import ManifestService
from proxy.core.errors import (
    ManifestUnknown,
    RegistryError,
    StorageError,
    UpstreamContentError,
    UpstreamError,
    UpstreamStatus,
    to_registry_error,
)
from proxy.core.media import INDEX_TYPES, OCI_INDEX
from proxy.core.reference import check_digest
from proxy.core.singleflight import SingleFlight
from proxy.fetch.upstream import Upstream
from storage.base import MetadataStore

log = logging.getLogger(__name__)

MAX_REFERRERS_SIZE = 4 * 1024 * 1024
MAX_PAGES = 8
#: Fallback-tag descriptors without ``artifactType`` completed from their manifests, at most.
MAX_COMPLETED = 64
RECORD_KIND = "referrers"


@dataclass(frozen=True, slots=True)
class Referrers:
    """A referrers answer: index bytes, whether a filter was applied, ``HIT|MISS|STALE``."""

    body: bytes
    filtered: bool
    cache: str


def empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def _serialize(index: dict[str, Any]) -> bytes:
    return json.dumps(index, separators=(",", ":")).encode()


def _descriptors(document: object, *, upstream: str) -> list[dict[str, Any]]:
    if not isinstance(document, dict) or not isinstance(document.get("manifests", []), list):
        raise UpstreamContentError("referrers answer is not an image index", upstream=upstream)
    return [d for d in document.get("manifests", []) if isinstance(d, dict)]


class ReferrersService:
    def __init__(
        self, manifests: ManifestService, meta: MetadataStore, *, offline: bool = False
    ) -> None:
        self.manifests = manifests
        self.meta = meta
        self.offline = offline
        self._fetches: SingleFlight[tuple[str, str, str], bytes] = SingleFlight()

    async def get(
        self, upstream: Upstream, repository: str, digest: str, artifact_type: str | None
    ) -> Referrers:
        key = digest.replace(":", "-")
        cached = await self._record(upstream, repository, key)
        body: bytes
        cache = "HIT"
        if cached is not None and (
            self.offline or time.time() - cached[1] < upstream.config.tag_ttl
        ):
            body = cached[0]
        elif self.offline:
            body = _serialize(empty_index())
        else:
            try:
                body = await self._fetches.run(
                    (upstream.name, repository, digest),
                    lambda: self._fetch(upstream, repository, digest, key),
                )
                cache = "HIT" if cached is not None and cached[0] == body else "MISS"
            except (UpstreamError, RegistryError) as exc:
                if cached is None:
                    if isinstance(exc, RegistryError):
                        raise
                    raise to_registry_error(exc, not_found=ManifestUnknown) from exc
                log.warning(
                    "serving stale referrers upstream=%s repository=%s digest=%s error=%s",
                    upstream.name,
                    repository,
                    digest,
                    exc,
                )
                body, cache = cached[0], "STALE"
        if not artifact_type:
            return Referrers(body, False, cache)
        index = json.loads(body)
        index["manifests"] = [
            d for d in index.get("manifests", []) if d.get("artifactType") == artifact_type
        ]
        return Referrers(_serialize(index), True, cache)

    async def _record(
        self, upstream: Upstream, repository: str, key: str
    ) -> tuple[bytes, float] | None:
        try:
            raw = await self.meta.get_record(upstream.name, repository, RECORD_KIND, key)
        except StorageError as exc:
            log.warning("cannot read referrers record error=%s", exc)
            return None
        if raw is None:
            return None
        try:
            stored = json.loads(raw)
            return str(stored["body"]).encode(), float(stored["checked_at"])
        except (ValueError, KeyError, TypeError):
            return None

    async def _fetch(self, upstream: Upstream, repository: str, digest: str, key: str) -> bytes:
        try:
            body = await self._from_api(upstream, repository, digest)
        except UpstreamStatus as exc:
            if exc.status != 404:
                raise
            body = await self._from_fallback_tag(upstream, repository, digest)
        record = json.dumps({"body": body.decode(), "checked_at": time.time()}).encode()
        with contextlib.suppress(StorageError):
            await self.meta.set_record(upstream.name, repository, RECORD_KIND, key, record)
        return body

    async def _from_api(self, upstream: Upstream, repository: str, digest: str) -> bytes:
        """Upstream's referrers answer: its bytes when it is one page, else the pages merged."""
        path = f"/v2/{repository}/referrers/{digest}"
        pages: list[bytes] = []
        query: dict[str, str] | None = None
        for _ in range(MAX_PAGES):
            async with upstream.request(
                "GET",
                path,
                scope=f"repository:{repository}:pull",
                headers={"Accept": OCI_INDEX},
                query=query,
            ) as resp:
                data = await resp.content.read(MAX_REFERRERS_SIZE + 1)
                link = resp.headers.get("Link", "")
            if len(data) > MAX_REFERRERS_SIZE:
                raise UpstreamContentError("referrers answer too large", upstream=upstream.name)
            try:
                _descriptors(json.loads(data), upstream=upstream.name)
            except (ValueError, UnicodeDecodeError) as exc:
                raise UpstreamContentError(
                    "referrers answer is not JSON", upstream=upstream.name
                ) from exc
            pages.append(data)
            query = _next_page(link, path)
            if query is None:
                break
        if len(pages) == 1:
            return pages[0]
        merged = empty_index()
        for page in pages:
            merged["manifests"] += _descriptors(json.loads(page), upstream=upstream.name)
        return _serialize(merged)

    async def _complete(
        self, upstream: Upstream, repository: str, entry: dict[str, Any]
    ) -> dict[str, Any]:
        """A fallback-tag descriptor without ``artifactType``, completed as the referrers API
        would answer it: the manifest's ``artifactType``, else its config's media type, and
        its annotations. The manifest is fetched (and cached) under the subject's repository;
        a descriptor whose manifest cannot be read is passed on as it is."""
        digest = entry.get("digest")
        if not isinstance(digest, str) or entry.get("mediaType") in INDEX_TYPES:
            return entry
        try:
            check_digest(digest)
            found = await self.manifests.by_digest(upstream, repository, digest, head=False)
            document = json.loads(found.data or b"{}")
        except (RegistryError, ValueError, UnicodeDecodeError):
            return entry
        if not isinstance(document, dict):
            return entry
        config = document.get("config")
        artifact_type = document.get("artifactType") or (
            config.get("mediaType") if isinstance(config, dict) else None
        )
        completed = dict(entry)
        if isinstance(artifact_type, str):
            completed["artifactType"] = artifact_type
        if isinstance(document.get("annotations"), dict) and "annotations" not in entry:
            completed["annotations"] = document["annotations"]
        return completed

    async def _from_fallback_tag(self, upstream: Upstream, repository: str, digest: str) -> bytes:
        """The referrers tag schema: tag ``<alg>-<hex>`` holds an index of the referrers."""
        tag = digest.replace(":", "-")
        try:
            manifest = await self.manifests.by_tag(upstream, repository, tag, head=False)
        except ManifestUnknown:
            return _serialize(empty_index())
        if manifest.media_type not in INDEX_TYPES or manifest.data is None:
            return _serialize(empty_index())
        try:
            descriptors = _descriptors(json.loads(manifest.data), upstream=upstream.name)
        except (ValueError, UnicodeDecodeError):
            return _serialize(empty_index())
        for position, entry in enumerate(descriptors[:MAX_COMPLETED]):
            if "artifactType" not in entry:
                descriptors[position] = await self._complete(upstream, repository, entry)
        index = empty_index()
        index["manifests"] = descriptors
        return _serialize(index)


def _next_page(link: str, path: str) -> dict[str, str] | None:
    """The query of a ``Link: <...?last=x>; rel="next"`` on the same path, else None."""
    if 'rel="next"' not in link:
        return None
    target = link.split(";")[0].strip().strip("<>")
    parts = urlsplit(target)
    if parts.path and parts.path != path:
        return None
    query: dict[str, str] = {}
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if name:
            query[name] = value
    return query or None
