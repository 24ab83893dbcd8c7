"""One tag for every architecture: platform rules, index synthesis, platform selection.

A tag matching a rule of the ``platforms:`` section is served as a synthesized index::

    upstream's own entries for the tag           (an index's entries as they are; a single
                                                  manifest as one entry, platform from its config)
  + one entry per rule source whose platform     (a source index contributes its entry for that
    upstream does not already provide             platform; a single manifest itself)

Upstream entries win; attestation entries (``unknown/unknown``) pass through untouched and never
count as a platform. The document is a Docker manifest list when every child is a Docker schema2
manifest, else an OCI index, serialized compactly in a fixed order: the same sources always give
the same bytes, hence the same digest, across requests and restarts. When no source adds an
entry, the upstream's own document is served unchanged (its digest stays the upstream's).

Children from other repositories are then requested under the pulled repository
(``/v2/library/mysql/manifests/sha256:<arm64 child>``); the mapping digest -> source repository
is kept in the metadata store (``_sources``), for the child and, once the child is read, for its
config and layers.

Clients whose ``Accept`` names manifest types but no index type get the child for their platform
(User-Agent ``os/… arch/…``, a hint only, else ``platforms.default``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from proxy.access.routing import Router
from proxy.cache.blobs import BlobService
from proxy.cache.manifests import Manifest, ManifestService
from proxy.core.errors import ManifestUnknown, RegistryError, UpstreamContentError
from proxy.core.media import INDEX_TYPES, MANIFEST_LIST_V2, MANIFEST_V2, OCI_INDEX
from proxy.core.reference import digest_of, parse_image
from proxy.core.singleflight import SingleFlight
from proxy.fetch.upstream import Upstream, Upstreams
from proxy.platforms.rules import (
    Entry,
    Platform,
    PlatformsConfig,
    Rule,
    index_entries,
    platform_from_user_agent,
    render,
)
from storage.base import MetadataStore

log = logging.getLogger(__name__)


class PlatformService:
    """Synthesizes indexes for rule-matched tags and serves the children across repositories."""

    def __init__(
        self,
        config: PlatformsConfig,
        *,
        manifests: ManifestService,
        blobs: BlobService,
        meta: MetadataStore,
        upstreams: Upstreams,
        router: Router,
    ) -> None:
        self.config = config
        self.manifests = manifests
        self.blobs = blobs
        self.meta = meta
        self.upstreams = upstreams
        self.router = router
        self._builds: SingleFlight[tuple[str, str, str], tuple[Manifest, list[Entry]]] = (
            SingleFlight()
        )

    def rule_for(self, upstream: str, repository: str, tag: str) -> Rule | None:
        default = upstream == self.router.default
        for rule in self.config.rules:
            if rule.matches(upstream, repository, tag, default=default):
                return rule
        return None

    # -- tags ------------------------------------------------------------------------------------

    async def by_tag(
        self, upstream: Upstream, repository: str, tag: str, *, head: bool
    ) -> Manifest:
        rule = self.rule_for(upstream.name, repository, tag)
        if rule is None:
            return await self.manifests.by_tag(upstream, repository, tag, head=head)
        manifest, _ = await self.synthesize(upstream, repository, tag, rule)
        return manifest

    async def describe(
        self, upstream: Upstream, repository: str, tag: str
    ) -> tuple[Manifest, list[Entry]]:
        """The document served for a tag and its entries, with their sources."""
        rule = self.rule_for(upstream.name, repository, tag)
        if rule is not None:
            return await self.synthesize(upstream, repository, tag, rule)
        manifest = await self.manifests.by_tag(upstream, repository, tag, head=False)
        if manifest.media_type in INDEX_TYPES:
            return manifest, index_entries(manifest)
        return manifest, [await self._single_entry(upstream, repository, manifest, "upstream")]

    async def synthesize(
        self, upstream: Upstream, repository: str, tag: str, rule: Rule, *, force: bool = False
    ) -> tuple[Manifest, list[Entry]]:
        """``force``: rebuild even within the tag TTL (scheduled sync does, once it refreshed
        the tags the index is built from)."""
        key = (upstream.name, repository, tag)
        record = await self.meta.get_record(upstream.name, repository, "synth", tag)
        previous = json.loads(record) if record else None
        if previous and (
            self.manifests.offline
            or (not force and time.time() - previous["checked_at"] < upstream.config.tag_ttl)
        ):
            found = await self.manifests.local(previous["digest"])
            if found is not None:
                return found, [Entry(e["descriptor"], e["source"]) for e in previous["entries"]]
        try:
            built, entries = await self._builds.run(
                key, lambda: self._build(upstream, repository, tag, rule)
            )
        except RegistryError as exc:
            if previous is None or exc.status == 404:
                raise
            found = await self.manifests.local(previous["digest"], cache="STALE")
            if found is None:
                raise
            log.warning(
                "serving stale synthesized index repository=%s tag=%s error=%s",
                repository,
                tag,
                exc.code,
            )
            return found, [Entry(e["descriptor"], e["source"]) for e in previous["entries"]]
        cache = "HIT" if previous and previous["digest"] == built.digest else "MISS"
        return Manifest(built.digest, built.media_type, built.size, built.data, cache), entries

    async def _build(
        self, upstream: Upstream, repository: str, tag: str, rule: Rule
    ) -> tuple[Manifest, list[Entry]]:
        entries: list[Entry] = []
        covered: set[Platform] = set()
        own: Manifest | None = None
        try:
            own = await self.manifests.by_tag(upstream, repository, tag, head=False)
        except RegistryError as exc:
            if exc.status != 404:
                raise
        if own is not None:
            if own.media_type in INDEX_TYPES:
                entries = index_entries(own)
            else:
                entries = [await self._single_entry(upstream, repository, own, "upstream")]
            covered = {p for e in entries if (p := e.platform) and not p.unknown}
        added = 0
        for platform, template in rule.sources:
            if platform in covered:
                continue
            entry = await self._source_entry(upstream, repository, tag, platform, template)
            if entry is not None:
                entries.append(entry)
                covered.add(platform)
                added += 1
        if not entries:
            raise ManifestUnknown({"tag": tag}, message="no source has this tag")
        if own is not None and not added:
            manifest = own  # nothing to add: upstream's own bytes, upstream's own digest
        else:
            children = [e.descriptor for e in entries]
            media_type = (
                MANIFEST_LIST_V2
                if all(c.get("mediaType") == MANIFEST_V2 for c in children)
                else OCI_INDEX
            )
            doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": children}
            data = json.dumps(doc, separators=(",", ":")).encode()
            digest = digest_of(data)
            await self.manifests.store.put_manifest(digest, data, media_type)
            manifest = Manifest(digest, media_type, len(data), data, "MISS")
        record = {
            "digest": manifest.digest,
            "checked_at": time.time(),
            "entries": [{"descriptor": e.descriptor, "source": e.source} for e in entries],
        }
        await self.meta.set_record(
            upstream.name, repository, "synth", tag, json.dumps(record).encode()
        )
        return manifest, entries

    async def _source_entry(
        self, upstream: Upstream, repository: str, tag: str, platform: Platform, template: str
    ) -> Entry | None:
        reference = render(template, repository, tag)
        ref = parse_image(reference)
        src_name, src_repo = self.router.route(ref.repository, None)
        source = self.upstreams[src_name]
        label = f"{src_name}/{src_repo}:{ref.reference}"
        try:
            found = await self.manifests.get(source, src_repo, ref.reference, head=False)
        except RegistryError as exc:
            log.warning(
                "platform source skipped source=%s platform=%s error=%s", label, platform, exc.code
            )
            return None
        if found.media_type in INDEX_TYPES:
            match = next((e for e in index_entries(found) if e.platform == platform), None)
            if match is None:
                log.warning(
                    "platform source has no entry for platform source=%s platform=%s",
                    label,
                    platform,
                )
                return None
            entry = Entry(match.descriptor, label)
        else:
            entry = await self._single_entry(source, src_repo, found, label)
            if entry.platform != platform:
                log.warning(
                    "platform source is another platform source=%s wanted=%s got=%s",
                    label,
                    platform,
                    entry.platform,
                )
                return None
        await self.remember(
            upstream.name, repository, entry.descriptor["digest"], src_name, src_repo
        )
        return entry

    async def _single_entry(
        self, upstream: Upstream, repository: str, manifest: Manifest, source: str
    ) -> Entry:
        """A single manifest as an index entry; its platform is read from its config blob."""
        assert manifest.data is not None
        doc = json.loads(manifest.data)
        config_digest = (doc.get("config") or {}).get("digest")
        platform = None
        if config_digest:
            config = await self.blobs.read(upstream, repository, config_digest)
            try:
                platform = Platform.from_json(json.loads(config))
            except ValueError:
                platform = None
        if platform is None:
            raise UpstreamContentError("image config names no platform", upstream=upstream.name)
        descriptor = {
            "mediaType": manifest.media_type,
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": platform.to_json(),
        }
        return Entry(descriptor, source)

    # -- children across repositories ------------------------------------------------------------

    async def remember(
        self, upstream: str, repository: str, digest: str, src_upstream: str, src_repo: str
    ) -> None:
        if (src_upstream, src_repo) == (upstream, repository):
            return
        value = json.dumps({"upstream": src_upstream, "repository": src_repo}).encode()
        await self.meta.set_record(upstream, repository, "sources", digest, value)

    async def source_of(
        self, upstream: Upstream, repository: str, digest: str
    ) -> tuple[Upstream, str]:
        """Where to fetch ``digest`` requested under ``repository`` from upstream."""
        if not self.config.rules:
            return upstream, repository
        raw = await self.meta.get_record(upstream.name, repository, "sources", digest)
        if raw is None:
            return upstream, repository
        src = json.loads(raw)
        return self.upstreams[src["upstream"]], src["repository"]

    async def child_manifest(
        self, upstream: Upstream, repository: str, digest: str, *, head: bool
    ) -> Manifest:
        source, src_repo = await self.source_of(upstream, repository, digest)
        manifest = await self.manifests.by_digest(source, src_repo, digest, head=head)
        if (source, src_repo) != (upstream, repository) and manifest.data is not None:
            # The client asks for this child's config and layers under `repository` next.
            doc = json.loads(manifest.data)
            for blob in [doc.get("config") or {}, *(doc.get("layers") or [])]:
                if isinstance(blob, dict) and blob.get("digest"):
                    await self.remember(
                        upstream.name, repository, blob["digest"], source.name, src_repo
                    )
        return manifest

    # -- clients that cannot take an index -------------------------------------------------------

    async def for_client(
        self,
        upstream: Upstream,
        repository: str,
        index: Manifest,
        entries: Sequence[Entry] | None,
        *,
        user_agent: str,
        head: bool,
    ) -> Manifest:
        """The child of ``index`` for the client's platform (UA hint, else the default)."""
        wanted = platform_from_user_agent(user_agent) or self.config.default
        if entries is None:
            if index.data is None:
                index = await self.manifests.by_digest(
                    upstream, repository, index.digest, head=False
                )
            entries = index_entries(index)
        match = next((e for e in entries if e.platform == wanted), None)
        if match is None:
            available = sorted({str(p) for e in entries if (p := e.platform) and not p.unknown})
            raise ManifestUnknown(
                {"platform": str(wanted), "available": available},
                message=f"no manifest for {wanted} in this tag",
            )
        return await self.child_manifest(
            upstream, repository, match.descriptor["digest"], head=head
        )
