"""The S3 driver: objects in an S3-compatible bucket, a local work dir for spools and hot blobs.

Keys are those of the filesystem layout under ``<prefix>/`` (``storage/__init__.py``). Writes of
large content spool to ``<work-dir>/tmp/<instance>/`` (which local readers follow while it grows)
and upload as multipart parts **straight to the final key** while they arrive; the upload is
completed only in ``commit``, after size and digest were verified, and aborted otherwise — there is
no copy afterwards, and no object is ever visible under a digest it does not hash to. Objects
smaller than one part are sent with one ``PutObject`` at commit.

Each multipart upload in progress is recorded next to its spool file (``<spool>.upload``); the
temp directory of a process that died (its ``flock`` is free) is cleaned at the next start and its
uploads aborted. Uploads older than a day under the prefix (a lost work dir) are aborted too; a
bucket lifecycle rule for incomplete multipart uploads is the backstop (README).

Verified blobs are kept in the local read tier (:mod:`storage.tier`) so warm reads are sendfile from
the local disk; a blob not in the tier is read from the bucket (Range supported), or by the caller
from a presigned URL (``url_for``; ``proxy.fetch.download`` fills the tier that way).

Everything the object store does wrong becomes :class:`storage.errors.StorageError` at this
boundary: ``botocore`` client errors, connection errors and timeouts alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from storage.base import LocalFile, ObjectInfo
from storage.errors import StorageError
from storage.settings import S3Settings, WorkSettings
from storage.tempdir import ProcessTemp
from storage.tier import LocalTier
from storage.writer import SpoolWriter, os_error

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1024 * 1024
#: Multipart uploads older than this under the prefix are taken as abandoned at start.
ABANDONED_AFTER = 24 * 3600.0
#: Keys (or multipart uploads) asked for per listing request: S3's maximum and default.
LIST_PAGE = 1000
#: Listing requests at most for one walk of the uploads (a store whose markers never end).
MAX_PAGES = 100_000
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
#: Seconds requests fail fast after the store was found unreachable.
DOWN_FOR = 2.0


class _Missing(Exception):
    """The object is not there (404)."""


class S3Writer(SpoolWriter):
    """Spool locally and upload full parts as they fill; complete only after verification."""

    def __init__(self, driver: S3Driver, key: str, algorithm: str) -> None:
        super().__init__(driver.tmp_dir, key, algorithm)
        self._driver = driver
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._pending: list[asyncio.Task[dict[str, Any]]] = []
        self._sent = 0  # bytes handed to part uploads
        self._record = self.path.with_name(self.path.name + ".upload")

    async def _written(self, before: int) -> None:
        part = self._driver.settings.part_size
        while self.size - self._sent >= part:
            await self._start_part(self._sent, part)

    async def _start_part(self, offset: int, length: int) -> None:
        """Queue one part. Its bytes are read back from the spool when a slot is free, so the
        download never waits for the object store: the upload catches up behind it, and memory
        holds at most ``S3Settings.upload_concurrency`` parts per process."""
        if self._upload_id is None:
            self._upload_id = await self._driver.create_upload(self.key)
            self._record.write_text(json.dumps({"key": self.key, "upload_id": self._upload_id}))
        number = len(self._pending) + 1
        self._sent = offset + length
        self._pending.append(asyncio.create_task(self._upload(number, offset, length)))

    async def _upload(self, number: int, offset: int, length: int) -> dict[str, Any]:
        assert self._upload_id is not None
        async with self._driver.part_slots:
            data = await asyncio.to_thread(self._read_spool, offset, length)
            return await self._driver.upload_part(self.key, self._upload_id, number, data)

    def _read_spool(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise StorageError("spool file shorter than written", path=str(self.path), op="write")
        return data

    async def _publish(self) -> None:
        if self._upload_id is None:
            data = await asyncio.to_thread(self._read_spool, 0, self.size)
            await self._driver.put(self.key, data)
        else:
            if self.size > self._sent or not self._pending:
                await self._start_part(self._sent, self.size - self._sent)
            while self._pending:
                self._parts.append(await self._pending.pop(0))
            await self._driver.complete_upload(self.key, self._upload_id, self._parts)
            self._upload_id = None
            self._record.unlink(missing_ok=True)
        self._close_fd()
        final = self._driver.tier.adopt(self.path, self.key, self.size)
        if final is not None:
            self.path = final

    async def _discard(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                await self._driver.abort_upload(self.key, upload_id)
            except StorageError as exc:
                # The record stays: the next start (or the lifecycle rule) aborts it.
                log.warning("cannot abort an upload key=%s error=%s", self.key, exc)
                return
        self._record.unlink(missing_ok=True)


class TierWriter(S3Writer):
    """Fill the local tier from a read of the bucket (or of a peer); nothing is uploaded unless
    :meth:`make_durable` is called (this replica took a download over from a peer that died):
    from then on it uploads like an :class:`S3Writer`, the parts already spooled included."""

    def __init__(self, driver: S3Driver, key: str, algorithm: str) -> None:
        super().__init__(driver, key, algorithm)
        self._uploading = False

    async def make_durable(self) -> None:
        if not self._uploading:
            self._uploading = True
            await super()._written(0)

    async def _written(self, before: int) -> None:
        if self._uploading:
            await super()._written(before)

    async def _publish(self) -> None:
        if self._uploading:
            await super()._publish()
            return
        self._close_fd()
        final = self._driver.tier.adopt(self.path, self.key, self.size)
        if final is not None:
            self.path = final


class S3Driver:
    """Objects in ``bucket`` under ``prefix``; spools and the read tier under ``work.path``."""

    name = "s3"

    def __init__(self, settings: S3Settings, work: WorkSettings) -> None:
        self.settings = settings
        self.prefix = settings.prefix.strip("/")
        self.location = f"s3://{settings.bucket}/{self.prefix}"
        self.instance = uuid.uuid4().hex[:12]
        self.work = Path(work.path).absolute()
        self.temp = ProcessTemp(self.work / "tmp", self.instance)
        #: Where this process's downloads spool (``<work-dir>/tmp/<instance>/``).
        self.tmp_dir = self.temp.path
        self.tier = LocalTier(self.work / "tier", work.max_size)
        self.on_request: Callable[[str, str, float], None] | None = None
        #: Part uploads at once, all blobs together (each holds one part in memory).
        self.part_slots = asyncio.Semaphore(settings.upload_concurrency)
        #: Spool files of dead processes removed by ``open`` (``regproxy gc`` reports them).
        self.leftovers: list[tuple[Path, int]] = []
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._ready_at = 0.0
        self._down_until = 0.0
        self._ready: list[str] = []

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- lifetime ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the bucket, claim a work dir and abort what dead processes left."""
        endpoint = (
            self.settings.endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        path_style = self.settings.path_style
        if path_style is None:
            path_style = bool(endpoint)
        config = BotoConfig(
            s3={
                "addressing_style": "path" if path_style else "auto",
                # botocore signs a SHA-256 of every part it uploads over HTTP (and over HTTPS
                # without a checksum header), on the event loop: a second hash of every cold
                # byte. Content is verified against its digest when read back (the tier,
                # `verify`), so the body goes unsigned.
                "payload_signing_enabled": False,
            },
            signature_version="s3v4",  # presigned URLs too (botocore presigns with v2 else)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=64,
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        region = (
            self.settings.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=region,
                endpoint_url=endpoint,
                aws_access_key_id=self.settings.access_key_id,
                aws_secret_access_key=self.settings.secret_access_key,
                config=config,
            )
        )
        problem = await self._bucket_problem()
        if problem is not None:
            await self._stack.aclose()
            raise StorageError(f"bucket {self.bucket}: {problem}", op="open")
        try:
            (self.work / "tier").mkdir(parents=True, exist_ok=True)
            self.temp.claim()
        except OSError as exc:
            raise os_error("cannot prepare work directory", self.work, exc, "open") from exc
        await self._abort_leftovers()
        await asyncio.to_thread(self.tier.scan)

    async def _bucket_problem(self) -> str | None:
        try:
            await self._call("head_bucket", lambda: self._client.head_bucket(Bucket=self.bucket))
        except _Missing:
            return "does not exist"
        except StorageError as exc:
            reason = str(exc)
            if "403" in reason or "Forbidden" in reason or "AccessDenied" in reason:
                return "access denied (check the credentials)"
            return reason
        return None

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    async def _abort_leftovers(self) -> None:
        aborted = 0
        for entry in self.temp.dead():
            for record in entry.glob("*.upload"):
                with contextlib.suppress(OSError, ValueError, KeyError, StorageError, _Missing):
                    info = json.loads(record.read_text())
                    await self.abort_upload(info["key"], info["upload_id"])
                    record.unlink()  # done with: not a leftover
                    aborted += 1
        self.leftovers = self.temp.remove_dead()
        try:
            aborted += await self._abort_abandoned()
        except (StorageError, _Missing) as exc:
            log.warning("cannot list multipart uploads error=%s", exc)
        if aborted:
            log.warning("aborted multipart uploads left by a previous run count=%d", aborted)

    async def _abort_abandoned(self) -> int:
        """Abort the multipart uploads under the prefix begun over ``ABANDONED_AFTER`` ago.

        The listing goes page by page. AWS and Ceph RGW name the next page's markers
        (``NextKeyMarker``, ``NextUploadIdMarker``). SeaweedFS (4.48) marks a page truncated but
        names no key marker, and its markers do not page (what follows the last key is not
        listed): there the listing starts over after aborting what a page held (those uploads are
        gone from it), and ends at a truncated page with nothing to abort. Both are tested
        (``tests/test_storage.py``) on both stores.
        """
        cutoff = time.time() - ABANDONED_AFTER
        aborted = 0
        markers: dict[str, str] = {}
        for _ in range(MAX_PAGES):
            args = {"Bucket": self.bucket, "Prefix": self._key(""), "MaxUploads": LIST_PAGE}
            resp = await self._call(
                "list_uploads",
                functools.partial(self._client.list_multipart_uploads, **args, **markers),
            )
            aborted_here = 0
            for upload in resp.get("Uploads") or []:
                initiated = upload.get("Initiated")
                if initiated is not None and initiated.timestamp() < cutoff:
                    with contextlib.suppress(StorageError, _Missing):
                        await self.abort_upload(upload["Key"], upload["UploadId"], prefixed=True)
                        aborted_here += 1
            aborted += aborted_here
            if not resp.get("IsTruncated"):
                break
            following = {
                name: str(resp[field])
                for name, field in (
                    ("KeyMarker", "NextKeyMarker"),
                    ("UploadIdMarker", "NextUploadIdMarker"),
                )
                if resp.get(field)
            }
            if "KeyMarker" in following and following != markers:
                markers = following
            elif aborted_here:
                markers = {}  # no usable marker: list again, without what was just aborted
            else:
                log.warning(
                    "multipart uploads listed in part: the store names no next page count=%d",
                    len(resp.get("Uploads") or []),
                )
                break
        return aborted

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        self._client = None
        self.temp.release()

    async def check_ready(self) -> list[str]:
        now = time.monotonic()
        if now - self._ready_at < 1.0:
            return list(self._ready)
        problems = self.temp.check(self.work)
        try:
            await asyncio.wait_for(
                self._call(
                    "head_bucket",
                    lambda: self._client.head_bucket(Bucket=self.bucket),
                    probe=True,
                ),
                3.0,
            )
        except (StorageError, _Missing, TimeoutError) as exc:
            problems.append(f"object store unreachable: {exc or type(exc).__name__}")
        self._ready, self._ready_at = problems, time.monotonic()
        return problems

    # -- requests ------------------------------------------------------------------------------

    async def _call(self, op: str, call: Callable[[], Awaitable[T]], *, probe: bool = False) -> T:
        """Run one S3 request, translating failures and counting it.

        Once the store was unreachable, requests fail at once for ``DOWN_FOR`` seconds instead of
        each waiting out connection retries (pulls are relayed from upstream meanwhile); ``probe``
        requests (readiness) always go out, and the first success closes the gap.
        """
        if not probe and time.monotonic() < self._down_until:
            raise StorageError(
                "object store unreachable (recently failed)", op=op, unreachable=True
            )
        start = time.perf_counter()
        status = "ok"
        try:
            result = await call()
            self._down_until = 0.0
            return result
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND:
                status = "not_found"
                self._down_until = 0.0  # it answered: reachable
                raise _Missing(code) from exc
            status = "error"
            http = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if http >= 500:
                self._down_until = time.monotonic() + DOWN_FOR
            raise StorageError(
                f"object store answered {code or 'an error'}", op=op, unreachable=http >= 500
            ) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            status = "error"
            self._down_until = time.monotonic() + DOWN_FOR
            raise StorageError(
                f"object store unreachable ({type(exc).__name__})", op=op, unreachable=True
            ) from exc
        finally:
            if self.on_request is not None:
                self.on_request(op, status, time.perf_counter() - start)

    async def get(self, key: str) -> bytes | None:
        async def call() -> bytes:
            resp = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

        try:
            return await self._call("get", call)
        except _Missing:
            return None

    async def put(self, key: str, data: bytes) -> None:
        await self._call(
            "put",
            lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            resp = await self._call(
                "stat", lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            )
        except _Missing:
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    async def delete(self, key: str) -> bool:
        self.tier.remove(key)
        if await self.stat(key) is None:
            return False
        with contextlib.suppress(_Missing):
            await self._call(
                "delete",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)),
            )
        return True

    async def walk(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        strip = len(self._key(""))
        token: str | None = None
        while True:
            args: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self._key(prefix),
                "MaxKeys": LIST_PAGE,
            }
            if token:
                args["ContinuationToken"] = token
            try:
                page = await self._list_page(args)
            except _Missing:
                return
            for item in page.get("Contents") or []:
                yield ObjectInfo(
                    item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def _list_page(self, args: dict[str, Any]) -> dict[str, Any]:
        page: dict[str, Any] = await self._call(
            "list", lambda: self._client.list_objects_v2(**args)
        )
        return page

    def writer(self, key: str, algorithm: str) -> S3Writer:
        return S3Writer(self, key, algorithm)

    def tier_writer(self, key: str, algorithm: str) -> TierWriter:
        return TierWriter(self, key, algorithm)

    def local(self, key: str) -> LocalFile | None:
        return self.tier.get(key)

    async def read(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes] | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            resp = await self._call("read", lambda: self._client.get_object(**args))
        except _Missing:
            return None
        return self._stream(resp["Body"])

    async def _stream(self, body: Any) -> AsyncIterator[bytes]:
        try:
            async with body:
                while True:
                    try:
                        data = await body.read(CHUNK)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        raise StorageError(
                            f"object store read broke ({type(exc).__name__})",
                            op="read",
                            unreachable=True,
                        ) from exc
                    if not data:
                        return
                    yield data
        finally:
            with contextlib.suppress(Exception):
                body.close()

    async def url_for(self, key: str, expires: float) -> str | None:
        url: str = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(expires),
        )
        return url

    async def quarantine(self, key: str, name: str) -> str:
        await self.delete(key)  # a copy would cost as much as the download it replaces
        return "deleted"

    def touch(self, key: str) -> None:
        pass  # object stores keep no access time; recency lives in memory and Redis

    # -- multipart -----------------------------------------------------------------------------

    async def create_upload(self, key: str) -> str:
        try:
            resp = await self._call(
                "create_upload",
                lambda: self._client.create_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key)
                ),
            )
        except _Missing as exc:
            raise StorageError("bucket vanished", op="write") from exc
        return str(resp["UploadId"])

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes
    ) -> dict[str, Any]:
        try:
            resp = await self._call(
                "upload_part",
                lambda: self._client.upload_part(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                ),
            )
        except _Missing as exc:
            raise StorageError("multipart upload vanished", op="write") from exc
        return {"ETag": resp["ETag"], "PartNumber": number}

    async def complete_upload(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        parts = sorted(parts, key=lambda p: int(p["PartNumber"]))
        try:
            await self._call(
                "complete_upload",
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except _Missing as exc:
            raise StorageError("multipart upload vanished", op="write") from exc

    async def abort_upload(self, key: str, upload_id: str, *, prefixed: bool = False) -> None:
        full = key if prefixed else self._key(key)
        with contextlib.suppress(_Missing):
            await self._call(
                "abort_upload",
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id
                ),
                probe=True,  # cleanup is worth a try even while the store looks down
            )
