"""Typed settings of the storage layer; ``proxy.config`` loads them from YAML, env and flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CacheSettings:
    """Bounds of the cache."""

    #: Bytes stored at most (the whole bucket prefix on S3); unbounded when unset.
    max_size: int | None = None
    #: Eviction starts above this fraction of ``max_size``; defaults to 0.95.
    high_watermark: float = 0.95
    #: Eviction stops below this fraction of ``max_size``; defaults to 0.85.
    low_watermark: float = 0.85
    #: Image globs (``library/postgres:16*``) never evicted; defaults to none.
    pin: tuple[str, ...] = ()
    #: Also evict what was not used for this long (seconds); off when unset.
    blob_ttl: float | None = None


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach an S3-compatible object store.

    Unset credentials, endpoint and region come from the standard AWS chain (``AWS_*``
    environment, ``~/.aws`` files, web identity / IRSA, instance metadata).
    """

    #: The bucket, which must exist.
    bucket: str
    #: Key prefix inside the bucket, without leading or trailing ``/``; defaults to none.
    prefix: str = ""
    #: Endpoint URL (MinIO, Ceph RGW, SeaweedFS, R2, GCS); defaults to ``AWS_ENDPOINT_URL`` or AWS.
    endpoint: str | None = None
    #: Region; defaults to ``AWS_REGION``/``AWS_DEFAULT_REGION``, else ``us-east-1``.
    region: str | None = None
    #: Access key id; defaults to the AWS chain.
    access_key_id: str | None = None
    #: Secret access key (read from ``secret_access_key_file``); defaults to the AWS chain.
    secret_access_key: str | None = field(default=None, repr=False)
    #: Path-style addressing (``endpoint/bucket/key``); defaults to on when an endpoint is set.
    path_style: bool | None = None
    #: Answer blob GETs with a 307 to a presigned URL of the object; defaults to off.
    redirect: bool = False
    #: Lifetime of a presigned URL in seconds; defaults to 20 minutes.
    redirect_expiry: float = 1200.0
    #: Multipart part size in bytes; defaults to 8 MiB (S3's minimum is 5 MiB).
    part_size: int = 8 * 1024 * 1024
    #: Parts uploaded at once by the process, all blobs together; defaults to 1. Uploads follow
    #: downloads from the local spool and never hold a client up, so fewer at once leave more
    #: CPU to the clients; raise it when a remote bucket lets the spool backlog grow.
    upload_concurrency: int = 1


@dataclass(frozen=True)
class WorkSettings:
    """Each replica's own local disk: downloads in flight and the local read tier."""

    #: The directory; defaults to ``./regproxy-work``. Losing it loses nothing.
    path: Path = Path("./regproxy-work")
    #: Bytes of hot blobs kept in the local read tier; defaults to 10 GiB.
    max_size: int = 10 * 1024**3
