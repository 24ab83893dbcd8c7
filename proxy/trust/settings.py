"""The ``policy:`` section: which repositories are denied, which tags are allowed, whose
cosign signatures a repository's manifests need.

::

    policy:
      - repository: "myorg/*"              # glob over the repository name as clients ask for it
        require_signature:
          keys: [/etc/regproxy/cosign.pub] # PEM public keys: ECDSA, Ed25519 or RSA
      - repository: "library/*"
        allow_tags: ["3.*", "1.2?"]
      - repository: "*"
        deny: true

Key files are read when the section is parsed (start-up, SIGHUP): a file that cannot be read or
holds no supported public key stops start-up with one line naming it
(``policy[1].require_signature.keys[0]: cannot read /x: No such file or directory``).
:attr:`TrustSettings.fingerprint` identifies the policy and the keys' contents, so verdicts
recorded under one policy are never taken for another.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.core.settings import ConfigError

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

ENTRY_KEYS = frozenset({"repository", "deny", "allow_tags", "require_signature"})
SIGNATURE_KEYS = frozenset({"keys"})
_GLOB_RE = re.compile(r"[A-Za-z0-9._/*?!\[\]-]+")
_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9._*?!\[\]-]+")
MAX_KEY_FILE = 64 * 1024


@dataclass(frozen=True)
class TrustKey:
    """A public key signatures are verified with."""

    #: The file as configured (what messages and ``inspect`` show).
    path: str
    #: ``sha256:<hex>`` of the key's DER SubjectPublicKeyInfo.
    fingerprint: str
    #: ``ecdsa-p256``, ``ed25519``, ``rsa-3072``, ...
    kind: str
    public_key: PublicKey = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.path} ({self.kind}, {self.fingerprint[:19]})"


@dataclass(frozen=True)
class PolicyEntry:
    """One ``policy:`` entry; ``number`` is its 1-based place (messages say "policy entry 1")."""

    number: int
    repository: str
    deny: bool = False
    #: Tag globs; None: every tag.
    allow_tags: tuple[str, ...] | None = None
    #: Keys of ``require_signature``; empty: no signature needed.
    keys: tuple[TrustKey, ...] = ()

    def matches(self, upstream: str, repository: str, *, default: bool) -> bool:
        """Does the glob match ``repository`` (also ``upstream/repository``; for the default
        upstream a bare ``library/alpine`` too, as ``platforms:`` rules match)?"""
        names = (
            (repository, f"{upstream}/{repository}") if default else (f"{upstream}/{repository}",)
        )
        return any(fnmatch.fnmatchcase(n, self.repository) for n in names)

    def tag_allowed(self, tag: str) -> bool:
        return self.allow_tags is None or any(fnmatch.fnmatchcase(tag, g) for g in self.allow_tags)

    @property
    def label(self) -> str:
        return f"policy entry {self.number} ({self.repository})"


@dataclass(frozen=True)
class TrustSettings:
    entries: tuple[PolicyEntry, ...] = ()
    #: ``sha256:<hex>`` over the entries and the keys' contents; "" when there is no policy.
    fingerprint: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def entry_for(self, upstream: str, repository: str, *, default: bool) -> PolicyEntry | None:
        """The first entry whose glob matches: it decides."""
        for entry in self.entries:
            if entry.matches(upstream, repository, default=default):
                return entry
        return None


def _glob(value: object, key: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(key, "must be a glob string")
    text = str(value).strip()
    if not text or not pattern.fullmatch(text) or text.count("[") != text.count("]"):
        raise ConfigError(key, f"{text!r} is not a valid glob")
    return text


def load_key(path: object, key: str) -> TrustKey:
    """Read a PEM public key file (``PUBLIC KEY``, as ``cosign generate-key-pair`` writes)."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(key, "must be the path of a PEM public key file")
    path = path.strip()
    try:
        with open(Path(path), "rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(key, f"{path} is too large for a public key")
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        reason = "holds a private key, not a public key" if b"PRIVATE KEY" in data else str(exc)
        raise ConfigError(key, f"{path} is not a PEM public key: {reason}") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
        if public_key.curve.name not in curves:
            raise ConfigError(key, f"{path}: unsupported curve {public_key.curve.name}")
        kind = f"ecdsa-{curves[public_key.curve.name]}"
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        kind = "ed25519"
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise ConfigError(key, f"{path}: RSA keys must have at least 2048 bits")
        kind = f"rsa-{public_key.key_size}"
    else:
        raise ConfigError(
            key, f"{path}: unsupported key type {type(public_key).__name__} (ECDSA, Ed25519, RSA)"
        )
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()
    return TrustKey(path, fingerprint, kind, public_key)


def _entry(raw: object, index: int) -> PolicyEntry:
    key = f"policy[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(
            key, "must be a mapping with repository and deny, allow_tags or require_signature"
        )
    for name in raw:
        if name not in ENTRY_KEYS:
            raise ConfigError(f"{key}.{name}", "unknown setting")
    if raw.get("repository") in (None, ""):
        raise ConfigError(f"{key}.repository", "is required")
    repository = _glob(raw["repository"], f"{key}.repository", _GLOB_RE)
    deny = raw.get("deny", False)
    if not isinstance(deny, bool):
        raise ConfigError(f"{key}.deny", "must be true or false")
    allow_tags: tuple[str, ...] | None = None
    if raw.get("allow_tags") is not None:
        tags_raw = raw["allow_tags"]
        if isinstance(tags_raw, str):
            tags_raw = [tags_raw]
        if not isinstance(tags_raw, list) or not tags_raw:
            raise ConfigError(f"{key}.allow_tags", "must be a list of tag globs")
        allow_tags = tuple(
            _glob(t, f"{key}.allow_tags[{i}]", _TAG_GLOB_RE) for i, t in enumerate(tags_raw)
        )
    keys: tuple[TrustKey, ...] = ()
    if raw.get("require_signature") is not None:
        section = raw["require_signature"]
        skey = f"{key}.require_signature"
        if not isinstance(section, Mapping):
            raise ConfigError(skey, "must be a mapping with keys: [PEM files]")
        for name in section:
            if name not in SIGNATURE_KEYS:
                raise ConfigError(f"{skey}.{name}", "unknown setting")
        paths = section.get("keys")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths:
            raise ConfigError(f"{skey}.keys", "must list at least one public key file")
        keys = tuple(load_key(p, f"{skey}.keys[{i}]") for i, p in enumerate(paths))
    if deny and (allow_tags is not None or keys):
        raise ConfigError(
            key, "deny refuses everything: allow_tags and require_signature do not belong with it"
        )
    if not deny and allow_tags is None and not keys:
        raise ConfigError(key, "needs deny: true, allow_tags or require_signature")
    return PolicyEntry(index + 1, repository, deny, allow_tags, keys)


def parse(section: object) -> TrustSettings:
    """Validate the ``policy:`` list (None or empty: no policy); read its key files."""
    if section is None or section == []:
        return TrustSettings()
    if not isinstance(section, list):
        raise ConfigError(
            "policy", "must be a list of entries (repository, deny, allow_tags, require_signature)"
        )
    entries = tuple(_entry(raw, i) for i, raw in enumerate(section))
    return TrustSettings(entries, fingerprint(entries))


def fingerprint(entries: tuple[PolicyEntry, ...]) -> str:
    doc: list[dict[str, Any]] = [
        {
            "repository": e.repository,
            "deny": e.deny,
            "allow_tags": list(e.allow_tags) if e.allow_tags is not None else None,
            "keys": [k.fingerprint for k in e.keys],
        }
        for e in entries
    ]
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()
