"""Storage backends and cache metadata.

The contract is in :mod:`storage.base`; :mod:`storage.filesystem` is the embedded default.

On-disk layout (the ``--storage`` directory)::

    <root>/
    ├── blobs/<alg>/<hh>/<hex>                  blob bytes, verified, shared by every repository
    ├── manifests/<alg>/<hh>/<hex>              manifest bytes exactly as upstream sent them
    ├── manifests/<alg>/<hh>/<hex>.type         their media type (Content-Type)
    ├── repositories/<upstream>/<repository>/   mutable records, namespaced per upstream
    │   ├── _tags/<tag>                         {"digest","media_type","size","checked_at"}
    │   └── _tagslist/<key>                     the last tags/list answer for a query
    └── tmp/<instance>/                         downloads in progress of one running process,
        ├── .lock                               flock'ed while it lives; the directory of a dead
        └── <hex16>-<uuid>                      process is removed at the next start

``<upstream>`` is the configured upstream name (``docker.io``, ``ghcr.io``, ``corp``), so tags
of different registries never collide; blobs and manifests are content-addressed and shared.
``<hh>`` is the first two hex digits of the digest, to keep directories small. Repository names,
tags and digests are validated against the distribution grammar before they become paths, so no
component can be ``..`` or contain ``/`` where it should not.
"""

from storage.base import BlobWriter, ContentStore, MetadataStore, TagEntry
from storage.filesystem import FilesystemStorage

__all__ = ["BlobWriter", "ContentStore", "FilesystemStorage", "MetadataStore", "TagEntry"]
