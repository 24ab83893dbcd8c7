"""The trust policy on the pull path: what a manifest request may be answered with.

For a manifest of ``repository`` (by tag or digest) the first ``policy:`` entry whose glob
matches decides::

    no entry matches ─────────────────────────────────────────────► served
    deny ─────────────────────────────────────────────────────────► 403 DENIED
    allow_tags, a tag outside them ───────────────────────────────► 403 DENIED (digests pass)
    require_signature ─ a verdict for (digest, this policy) ──────► served
                      └ else verify: the signature manifest at ``sha256-<hex>.sig``, else the
                        referrers of the digest (OCI 1.1); a layer verifying with one of the
                        entry's keys over a payload naming the digest ─► recorded, served
                        none ─────────────────────────────────────► 403 DENIED, nothing recorded

A verified index covers the platform manifests it lists (each gets a verdict naming the index),
so a child asked by digest afterwards is served; a child asked first must be signed itself.
A synthesized index (``platforms:``) passes when every platform manifest in it passes the
policy of the repository it came from; its children then get verdicts under the pulled
repository. Cosign's own tags (``sha256-<hex>.sig``/``.att``/``.sbom``) and signature manifests
are metadata, not images: ``require_signature`` does not apply to them (``deny`` and
``allow_tags`` do).

Verdicts are records of the metadata store (kind ``trust``), shared by replicas through Redis,
each holding the fingerprint of the policy (globs, rules, keys' contents) it was reached under:
after a reload (SIGHUP) or restart with another policy or key, what is cached is verified again
before it is served. Signature manifests and payloads come through the manifest and blob
services, so they are cached like any tag (TTL, stale-if-error) and verified by digest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from proxy.cache.blobs import BlobService
from proxy.cache.manifests import Manifest, ManifestService
from proxy.cache.referrers import ReferrersService
from proxy.core.errors import (
    Denied,
    ManifestUnknown,
    RegistryError,
    StorageError,
)
from proxy.core.media import INDEX_TYPES
from proxy.core.metrics import Metrics
from proxy.core.reference import check_digest, is_digest
from proxy.core.singleflight import SingleFlight
from proxy.fetch.upstream import Upstream, Upstreams
from proxy.platforms.service import PlatformService
from proxy.trust import cosign
from proxy.trust.settings import PolicyEntry, TrustSettings
from storage.base import MetadataStore

log = logging.getLogger(__name__)

RECORD_KIND = "trust"
#: Tags cosign (and the referrers fallback) keep beside an image: metadata, never run.
METADATA_TAG_RE = re.compile(r"sha256-[0-9a-f]{64}(?:\.(?:sig|att|sbom))?")
#: Referrers manifests looked at per digest, at most.
MAX_REFERRER_SIGNATURES = 16


@dataclass(frozen=True)
class Verdict:
    """Whether a digest passes ``require_signature``: by which key, or why not."""

    ok: bool
    #: The key file that verified (for a covered child: the one that verified the index).
    key: str | None = None
    #: For a child: the index whose verified signature (or synthesis) covers it.
    via: str | None = None
    #: Why not (``no signature found``, ``signed, but over another digest``, ...).
    reason: str = ""


class TrustService:
    def __init__(
        self,
        settings: TrustSettings,
        *,
        manifests: ManifestService,
        blobs: BlobService,
        meta: MetadataStore,
        upstreams: Upstreams,
        default_upstream: str,
        referrers: ReferrersService | None = None,
        platforms: PlatformService | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.manifests = manifests
        self.blobs = blobs
        self.meta = meta
        self.upstreams = upstreams
        self.default_upstream = default_upstream
        self.referrers = referrers
        self.platforms = platforms
        self._verifications: SingleFlight[tuple[str, str, str, str], Verdict] = SingleFlight()
        #: (upstream, repository, digest) -> (fingerprint, verdict): good verdicts only.
        self._memo: LRUCache[tuple[str, str, str], tuple[str, Verdict]] = LRUCache(20_000)
        self.metrics = metrics
        #: (upstream, repository) -> the entry that decides (globs matched once per name).
        self._entries: LRUCache[tuple[str, str], PolicyEntry | None] = LRUCache(20_000)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def reload(self, settings: TrustSettings) -> None:
        """Take a new policy; verdicts reached under the old one no longer count."""
        old, self.settings = self.settings.fingerprint, settings
        self._memo.clear()
        self._entries.clear()
        log.info(
            "trust policy loaded entries=%d fingerprint=%s previous=%s",
            len(settings.entries),
            settings.fingerprint[:19] or "-",
            old[:19] or "-",
        )

    def entry_for(self, upstream: str, repository: str) -> PolicyEntry | None:
        key = (upstream, repository)
        if key in self._entries:
            return self._entries[key]
        entry = self.settings.entry_for(
            upstream, repository, default=upstream == self.default_upstream
        )
        self._entries[key] = entry
        return entry

    def name(self, upstream: str, repository: str) -> str:
        return repository if upstream == self.default_upstream else f"{upstream}/{repository}"

    # -- admission -------------------------------------------------------------------------------

    async def admit(
        self, upstream: Upstream, repository: str, reference: str, manifest: Manifest
    ) -> None:
        """Raise ``Denied`` unless ``manifest`` (asked as ``reference``) may be served."""
        if not self.settings.enabled:
            return
        entry = self.entry_for(upstream.name, repository)
        tag = None if is_digest(reference) else reference
        synthesized = (
            tag is not None
            and self.platforms is not None
            and self.platforms.rule_for(upstream.name, repository, tag) is not None
        )
        if entry is not None:
            self._rules(entry, upstream.name, repository, tag)
        if synthesized:
            assert tag is not None and self.platforms is not None
            await self._admit_synthesized(upstream, repository, tag, manifest, self.platforms)
            return
        if tag is None and self.platforms is not None and self.platforms.config.rules:
            await self._admit_from_source(upstream, repository, manifest, self.platforms)
        if entry is None or not entry.keys:
            return
        fingerprint = self.settings.fingerprint
        if self._known(upstream.name, repository, manifest.digest, fingerprint) is not None:
            return  # the warm path: one dictionary lookup
        if self._metadata(tag, manifest):
            return
        verdict = await self.verdict(upstream, repository, manifest.digest, entry, manifest)
        if not verdict.ok:
            name = self.name(upstream.name, repository)
            self._refuse(
                entry,
                "require_signature",
                f"{name}@{manifest.digest} has no signature by the keys of {entry.label}: "
                f"{verdict.reason}",
            )

    def _rules(self, entry: PolicyEntry, upstream: str, repository: str, tag: str | None) -> None:
        """``deny`` and ``allow_tags``: decided by the name alone."""
        name = self.name(upstream, repository)
        if entry.deny:
            self._refuse(entry, "deny", f"{name} is denied by {entry.label}")
        if tag is not None and not entry.tag_allowed(tag):
            allowed = ", ".join(entry.allow_tags or ())
            self._refuse(
                entry,
                "allow_tags",
                f"{name}:{tag} is not an allowed tag of {entry.label} (allow_tags: {allowed})",
            )

    def _refuse(self, entry: PolicyEntry, rule: str, message: str) -> None:
        if self.metrics is not None:
            self.metrics.trust_refusals.labels(rule, str(entry.number)).inc()
        log.warning("trust policy refused rule=%s entry=%d %s", rule, entry.number, message)
        raise Denied({"policy_entry": entry.number, "rule": rule}, message=message)

    @staticmethod
    def _metadata(tag: str | None, manifest: Manifest) -> bool:
        """Cosign's tags and signature manifests: not images, no signature of their own."""
        if tag is not None and METADATA_TAG_RE.fullmatch(tag):
            return True
        if manifest.data is None or manifest.media_type in INDEX_TYPES:
            return False
        try:
            doc = json.loads(manifest.data)
        except (ValueError, UnicodeDecodeError):
            return False
        layers = doc.get("layers") if isinstance(doc, dict) else None
        return (
            isinstance(layers, list)
            and bool(layers)
            and all(
                isinstance(layer, dict) and layer.get("mediaType") == cosign.SIMPLE_SIGNING
                for layer in layers
            )
        )

    # -- synthesized indexes ---------------------------------------------------------------------

    async def _admit_synthesized(
        self,
        upstream: Upstream,
        repository: str,
        tag: str,
        manifest: Manifest,
        platforms: PlatformService,
    ) -> None:
        """Every platform manifest passes the policy of the repository it came from."""
        fingerprint = self.settings.fingerprint
        if self._known(upstream.name, repository, manifest.digest, fingerprint) is not None:
            return
        served, entries = await platforms.describe(upstream, repository, tag)
        if served.digest != manifest.digest:
            return  # the tag moved meanwhile: the next request checks the new document
        pulled = self.name(upstream.name, repository)
        for item in entries:
            digest = item.descriptor.get("digest")
            if not isinstance(digest, str):
                continue
            src_up, src_repo, ref = self._source(upstream, repository, tag, item.source)
            entry = self.entry_for(src_up.name, src_repo)
            if entry is None:
                continue
            label = f"{self.name(src_up.name, src_repo)}:{ref}"
            self._rules(entry, src_up.name, src_repo, None if is_digest(ref) else ref)
            if not entry.keys:
                continue
            verdict = await self.recorded(src_up.name, src_repo, digest)
            if verdict is None:
                # A child is covered by its source's signed index: verify that one first.
                with contextlib.suppress(RegistryError):
                    top = await self.manifests.get(src_up, src_repo, ref, head=False)
                    if top.digest != digest:
                        await self.verdict(src_up, src_repo, top.digest, entry, top)
                verdict = await self.verdict(src_up, src_repo, digest, entry, None)
            if not verdict.ok:
                self._refuse(
                    entry,
                    "require_signature",
                    f"{pulled}:{tag} includes {label} ({digest}), which has no signature by "
                    f"the keys of {entry.label}: {verdict.reason}",
                )
        good = Verdict(True, via=None, key=None)
        await self._record(
            upstream.name, repository, manifest.digest, good, "synthesized", fingerprint
        )
        for item in entries:
            digest = item.descriptor.get("digest")
            if isinstance(digest, str):
                child = Verdict(True, via=manifest.digest)
                await self._record(
                    upstream.name, repository, digest, child, "synthesized", fingerprint
                )

    async def _admit_from_source(
        self, upstream: Upstream, repository: str, manifest: Manifest, platforms: PlatformService
    ) -> None:
        """A platform manifest synthesized from another repository and asked for by digest under
        the pulled one: unless a synthesized index listing it was admitted, the policy of the
        repository it comes from applies too."""
        digest = manifest.digest
        source, src_repo = await platforms.source_of(upstream, repository, digest)
        if (source.name, src_repo) == (upstream.name, repository):
            return
        if await self.recorded(upstream.name, repository, digest) is not None:
            return
        entry = self.entry_for(source.name, src_repo)
        if entry is None:
            return
        label = f"{self.name(upstream.name, repository)}@{digest}"
        src = self.name(source.name, src_repo)
        if entry.deny:
            self._refuse(entry, "deny", f"{label} comes from {src}, denied by {entry.label}")
        if not entry.keys or self._metadata(None, manifest):
            return
        verdict = await self.verdict(source, src_repo, digest, entry, manifest)
        if not verdict.ok:
            self._refuse(
                entry,
                "require_signature",
                f"{label} comes from {src} and has no signature by the keys of {entry.label}: "
                f"{verdict.reason}",
            )

    def _source(
        self, upstream: Upstream, repository: str, tag: str, source: str
    ) -> tuple[Upstream, str, str]:
        """The repository and reference of a synthesized entry (``upstream`` is the pulled
        tag; else ``<upstream name>/<repository>:<reference>``)."""
        if source == "upstream":
            return upstream, repository, tag
        name, _, rest = source.partition("/")
        match = re.fullmatch(r"(.+?)[:@](sha256:[0-9a-f]{64})", rest)
        if match:
            src_repo, ref = match.group(1), match.group(2)
        else:
            src_repo, _, ref = rest.rpartition(":")
        return self.upstreams[name], src_repo, ref

    # -- verdicts --------------------------------------------------------------------------------

    def _known(
        self, upstream: str, repository: str, digest: str, fingerprint: str
    ) -> Verdict | None:
        memo = self._memo.get((upstream, repository, digest))
        if memo is not None and memo[0] == fingerprint:
            return memo[1]
        return None

    async def recorded(self, upstream: str, repository: str, digest: str) -> Verdict | None:
        """The good verdict recorded for ``digest`` under the current policy, if any."""
        fingerprint = self.settings.fingerprint
        known = self._known(upstream, repository, digest, fingerprint)
        if known is not None:
            return known
        try:
            raw = await self.meta.get_record(
                upstream, repository, RECORD_KIND, digest.replace(":", "-")
            )
        except StorageError as exc:
            log.warning("cannot read a trust verdict error=%s", exc)
            return None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
            return None
        verdict = Verdict(True, key=doc.get("key"), via=doc.get("via"))
        self._memo[(upstream, repository, digest)] = (fingerprint, verdict)
        return verdict

    async def _record(
        self,
        upstream: str,
        repository: str,
        digest: str,
        verdict: Verdict,
        how: str,
        fingerprint: str,
    ) -> None:
        """Record a good verdict under the policy it was reached with (``fingerprint``, taken
        before the work began: a reload meanwhile must not lend it the new policy's name)."""
        self._memo[(upstream, repository, digest)] = (fingerprint, verdict)
        record = {
            "fingerprint": fingerprint,
            "how": how,
            "key": verdict.key,
            "via": verdict.via,
            "at": time.time(),
        }
        try:
            await self.meta.set_record(
                upstream,
                repository,
                RECORD_KIND,
                digest.replace(":", "-"),
                json.dumps(record).encode(),
            )
        except StorageError as exc:
            log.warning("cannot record a trust verdict error=%s", exc)

    async def verdict(
        self,
        upstream: Upstream,
        repository: str,
        digest: str,
        entry: PolicyEntry,
        manifest: Manifest | None,
    ) -> Verdict:
        """Recorded, else verified now (once per digest at a time) and recorded if good."""
        found = await self.recorded(upstream.name, repository, digest)
        if found is not None:
            return found
        fingerprint = self.settings.fingerprint
        return await self._verifications.run(
            (upstream.name, repository, digest, fingerprint),
            lambda: self._verify_and_record(
                upstream, repository, digest, entry, manifest, fingerprint
            ),
        )

    async def _verify_and_record(
        self,
        upstream: Upstream,
        repository: str,
        digest: str,
        entry: PolicyEntry,
        manifest: Manifest | None,
        fingerprint: str,
    ) -> Verdict:
        verdict = await self.verify(upstream, repository, digest, entry)
        if self.metrics is not None:
            self.metrics.trust_verifications.labels("verified" if verdict.ok else "failed").inc()
        if not verdict.ok:
            log.info(
                "signature not verified repository=%s digest=%s reason=%s",
                self.name(upstream.name, repository),
                digest,
                verdict.reason,
            )
            return verdict
        log.info(
            "signature verified repository=%s digest=%s key=%s",
            self.name(upstream.name, repository),
            digest,
            verdict.key,
        )
        await self._record(upstream.name, repository, digest, verdict, "signed", fingerprint)
        if manifest is None or (manifest.media_type in INDEX_TYPES and manifest.data is None):
            with contextlib.suppress(RegistryError):
                manifest = await self.manifests.by_digest(upstream, repository, digest, head=False)
        if manifest is not None and manifest.media_type in INDEX_TYPES and manifest.data:
            for child in _children(manifest.data):
                covered = Verdict(True, key=verdict.key, via=digest)
                if await self.recorded(upstream.name, repository, child) is None:
                    await self._record(
                        upstream.name, repository, child, covered, "covered", fingerprint
                    )
        return verdict

    async def verify(
        self, upstream: Upstream, repository: str, digest: str, entry: PolicyEntry
    ) -> Verdict:
        """Look for a signature of ``digest`` by one of ``entry``'s keys (nothing recorded)."""
        best: cosign.Outcome | None = None
        failure: RegistryError | None = None
        manifests: list[bytes] = []
        try:
            sig = await self.manifests.by_tag(
                upstream, repository, cosign.signature_tag(digest), head=False
            )
            if sig.data is not None:
                manifests.append(sig.data)
        except ManifestUnknown:
            pass
        except RegistryError as exc:
            failure = exc
        for data in manifests:
            verdict, outcome = await self._check_manifest(upstream, repository, digest, entry, data)
            if verdict is not None:
                return verdict
            best = _better(best, outcome)
        try:
            referrers = await self._referrer_signatures(upstream, repository, digest)
        except RegistryError as exc:
            referrers, failure = [], failure or exc
        for data in referrers:
            verdict, outcome = await self._check_manifest(upstream, repository, digest, entry, data)
            if verdict is not None:
                return verdict
            best = _better(best, outcome)
        if best is not None:
            return Verdict(False, reason=best.value)
        if failure is not None:
            return Verdict(False, reason=f"signature could not be fetched ({failure.message})")
        return Verdict(False, reason="no signature found")

    async def _check_manifest(
        self, upstream: Upstream, repository: str, digest: str, entry: PolicyEntry, data: bytes
    ) -> tuple[Verdict | None, cosign.Outcome | None]:
        best: cosign.Outcome | None = None
        for layer in cosign.signature_layers(data):
            try:
                payload = await self.blobs.read(
                    upstream, repository, layer.digest, limit=cosign.MAX_PAYLOAD + 1
                )
            except (RegistryError, StorageError):
                best = _better(best, cosign.Outcome.BAD_PAYLOAD)
                continue
            outcome, key = cosign.verify_layer(layer, payload, digest, entry.keys)
            if outcome is cosign.Outcome.VERIFIED and key is not None:
                return Verdict(True, key=key.path), outcome
            best = _better(best, outcome)
        return None, best

    async def _referrer_signatures(
        self, upstream: Upstream, repository: str, digest: str
    ) -> list[bytes]:
        if self.referrers is None:
            return []
        answer = await self.referrers.get(upstream, repository, digest, None)
        try:
            index = json.loads(answer.body)
        except (ValueError, UnicodeDecodeError):
            return []
        found: list[bytes] = []
        for desc in (index.get("manifests") or [])[:256]:
            if len(found) >= MAX_REFERRER_SIGNATURES:
                break
            if not isinstance(desc, dict):
                continue
            if desc.get("artifactType") not in cosign.SIGNATURE_ARTIFACT_TYPES:
                continue
            ref = desc.get("digest")
            try:
                check_digest(str(ref))
                manifest = await self.manifests.by_digest(
                    upstream, repository, str(ref), head=False
                )
            except RegistryError:
                continue
            if manifest.data is not None and _subject(manifest.data) == digest:
                found.append(manifest.data)
        return found

    # -- what inspect and ``policy check`` show --------------------------------------------------

    async def describe_all(
        self, upstream: Upstream, repository: str, reference: str, manifest: Manifest
    ) -> list[dict[str, Any]]:
        """:meth:`describe` for each platform of an index, once the index itself was checked
        (a verified index covers its platforms)."""
        with contextlib.suppress(Denied):
            await self.admit(upstream, repository, reference, manifest)
        if manifest.data is None or manifest.media_type not in INDEX_TYPES:
            return [await self.describe(upstream, repository, manifest.digest)]
        return [await self.describe(upstream, repository, d) for d in _children(manifest.data)]

    async def describe(self, upstream: Upstream, repository: str, digest: str) -> dict[str, Any]:
        """The policy's view of one manifest: rule, and whether and how it is signed."""
        entry = self.entry_for(upstream.name, repository)
        if entry is None:
            return {"policy_entry": None, "rule": None, "signed": None}
        if entry.deny:
            return {"policy_entry": entry.number, "rule": "deny", "signed": None}
        if not entry.keys:
            return {"policy_entry": entry.number, "rule": "allow_tags", "signed": None}
        verdict = await self.verdict(upstream, repository, digest, entry, None)
        return {
            "policy_entry": entry.number,
            "rule": "require_signature",
            "signed": verdict.ok,
            "key": verdict.key,
            "via": verdict.via,
            "reason": verdict.reason or None,
        }


def _better(best: cosign.Outcome | None, outcome: cosign.Outcome | None) -> cosign.Outcome | None:
    if outcome is None or outcome is cosign.Outcome.VERIFIED:
        return best
    if best is None or cosign.OUTCOME_RANK[outcome] > cosign.OUTCOME_RANK[best]:
        return outcome
    return best


def _children(data: bytes) -> list[str]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return []
    return [
        d["digest"]
        for d in entries
        if isinstance(d, dict) and isinstance(d.get("digest"), str) and is_digest(d["digest"])
    ]


def _subject(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    return digest if isinstance(digest, str) else None
