"""Storage backends and cache metadata.

The contract is in :mod:`storage.base`; :mod:`storage.filesystem` is the embedded default.

On-disk layout (the ``--storage`` directory)::

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
    ├── tmp/<instance>/                         downloads in progress of one running process,
    │   ├── .lock                               flock'ed while it lives; the directory of a dead
    │   └── <hex16>-<uuid>                      process is removed at the next start
    ├── stats/<host>.json                       hit/miss/pull counts for ``regproxy cache stats``
    └── quarantine/<kind>/<alg>-<hex>           files ``regproxy verify`` found corrupt

With ``--redis`` (keys made by ``storage.redis.key`` only; every record is also written to disk)::

    regproxy:tag:<upstream>:<repository>:<tag>          tag answer (JSON, as ``_tags/<tag>``)
    regproxy:rec:<upstream>:<repository>:<kind>:<key>   records: sources, synth, tagslist
    regproxy:access                                     ZSET digest -> last use (unix time)
    regproxy:lock:blob:<digest>                         the replica downloading it (30 s TTL,
                                                        refreshed while it runs)
    regproxy:inflight:<digest>                          {"path","size","owner","upstream",
                                                        "repository"}: its temp file,
                                                        which other replicas stream as it grows

``<upstream>`` is the configured upstream name (``docker.io``, ``ghcr.io``, ``corp``), so tags
of different registries never collide; blobs and manifests are content-addressed and shared.
``<hh>`` is the first two hex digits of the digest, to keep directories small. Repository names,
tags and digests are validated against the distribution grammar before they become paths, so no
component can be ``..`` or contain ``/`` where it should not.
"""

from storage.base import BlobWriter, ContentStore, MetadataStore, TagEntry
from storage.filesystem import FilesystemStorage

__all__ = ["BlobWriter", "ContentStore", "FilesystemStorage", "MetadataStore", "TagEntry"]
