"""Storage: a small driver contract, two drivers, and content, metadata and eviction on top.

Modules::

    storage.base         the contract: StorageDriver (bytes by key), BlobWriter, TagEntry
    storage.errors       StorageError, DigestMismatch (storage imports nothing from proxy/)
    storage.settings     typed settings: CacheSettings, S3Settings, WorkSettings
    storage.content      ContentStore: blobs and manifests by digest, records, listings
    storage.filesystem   the filesystem driver (default)
    storage.s3           the S3 driver (aiobotocore), with storage.tier, the local read tier
    storage.tempdir      each process's own flock'ed temp directory, and cleaning dead ones
    storage.eviction     size accounting and LRU eviction over any driver
    storage.maintenance  stats, purge, gc, verify over any driver
    storage.redis        shared metadata and cross-replica single flight; Sentinel URLs
    storage.identity     which store a replica uses, checked against its Redis's other replicas

Keys (the same on both drivers: under the directory, or under ``<prefix>/`` in the bucket)::

    <root>/
    ├── blobs/<alg>/<hh>/<hex>                  blob bytes, verified, shared by every repository
    ├── manifests/<alg>/<hh>/<hex>              manifest bytes exactly as upstream sent them
    ├── manifests/<alg>/<hh>/<hex>.type         their media type (Content-Type)
    ├── repositories/<upstream>/<repository>/   mutable records, namespaced per upstream
    │   ├── _tags/<tag>                         {"digest","media_type","size","checked_at"}
    │   ├── _tagslist/<key>                     the last tags/list answer for a query
    │   ├── _synth/<tag>                        the synthesized index's digest and entries
    │   ├── _sources/<digest>                   {"upstream","repository"} a child comes from
    │   └── _links/<digest>                     this repository is known to hold the digest
    ├── stats/<host>.json                       hit/miss/pull counts for ``regproxy cache stats``
    ├── store-id                                (filesystem, with Redis) this store's random id,
    │                                           made once (``storage.identity``)
    ├── stats/<host>.w<i>.json                  the same of worker i > 0 (``serve --workers N``)
    ├── quarantine/<kind>/<alg>-<hex>           (filesystem) what ``regproxy verify`` found corrupt
    └── tmp/<instance>/                         (filesystem) writes in progress of one process:
        ├── .lock                               flock'ed while it lives; the directory of a dead
        └── <hex16>-<uuid>                      process is removed at the next start

On S3, each replica's ``--work-dir`` (its own disk; losing it loses nothing)::

    <work-dir>/
    ├── tmp/<instance>/                         spools of downloads in flight (flock'ed as above)
    │   ├── <hex16>-<uuid>                      the bytes so far, followed by local readers
    │   └── <hex16>-<uuid>.upload               {"key","upload_id"}: aborted if the process died
    └── tier/blobs/<alg>/<hh>/<hex>             the local read tier: verified hot blobs, LRU,
                                                bounded by ``--work-max-size``

With ``--redis`` (keys made by ``storage.redis.key`` only; every record is also in the store)::

    regproxy:tag:<upstream>:<repository>:<tag>          tag answer (JSON, as ``_tags/<tag>``)
    regproxy:rec:<upstream>:<repository>:<kind>:<key>   records: sources, synth, tagslist
    regproxy:access                                     ZSET digest -> last use (unix time);
                                                        eviction reads it in pages and drops
                                                        what is gone (purge does too)
    regproxy:lock:blob:<digest>                         the replica downloading it: {"owner",
                                                        "url","upstream","repository"} (where
                                                        others stream it from); 6 s TTL, renewed
                                                        by its owner while it runs
    regproxy:lock:flight:<what>                         the process asking upstream for a
                                                        manifest or a tag now (10 s TTL);
                                                        the others wait for its answer
    regproxy:peer-token                                 the secret replicas show each other
    regproxy:sync:lease:<upstream>:<repository>:<id>    the replica running a sync entry now
    regproxy:sync:status:<upstream>:<repository>:<id>   that entry's last result (proxy.ops.sync)
    regproxy:store                                      {"id","store","instance"}: the store of
                                                        the replicas on this Redis (60 s TTL,
                                                        refreshed; ``storage.identity``)
    regproxy:login-failures:<address>                   failed logins of a client address in
                                                        its window (proxy.access.throttle)

``<upstream>`` is the configured upstream name (``docker.io``, ``ghcr.io``, ``corp``), so tags
of different registries never collide; blobs and manifests are content-addressed and shared.
``<hh>`` is the first two hex digits of the digest, to keep directories small. Repository names,
tags and digests are validated against the distribution grammar before they become keys, so no
component can be ``..`` or contain ``/`` where it should not.
"""

from __future__ import annotations

from pathlib import Path

from storage.base import BlobWriter, LocalFile, MetadataStore, ObjectInfo, StorageDriver, TagEntry
from storage.content import ContentStore
from storage.errors import DigestMismatch, StorageError
from storage.filesystem import FilesystemDriver
from storage.settings import CacheSettings, S3Settings, WorkSettings


def create_store(root: Path, s3: S3Settings | None, work: WorkSettings) -> ContentStore:
    """The store for a configuration: S3 when ``s3`` is set, else the directory ``root``."""
    if s3 is not None:
        from storage.s3 import S3Driver  # aiobotocore is only imported when it is used

        return ContentStore(S3Driver(s3, work))
    return ContentStore(FilesystemDriver(root))


__all__ = [
    "BlobWriter",
    "CacheSettings",
    "ContentStore",
    "DigestMismatch",
    "FilesystemDriver",
    "LocalFile",
    "MetadataStore",
    "ObjectInfo",
    "S3Settings",
    "StorageDriver",
    "StorageError",
    "TagEntry",
    "WorkSettings",
    "create_store",
]
