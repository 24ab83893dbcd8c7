"""One Redis, one store: replicas that share a Redis must share their store too.

Replicas on one Redis take each other's word for what the store holds (tags, locks, sync leases):
a replica whose store is a different one (its own empty volume, another bucket or prefix) would
follow downloads it never gets and skip sync entries another store is warmed by. So every replica
records its store's identity in Redis (``regproxy:store``: ``{"id", "store", "instance"}``,
60 s TTL, refreshed every 20 s while it runs) and **refuses to start** when the live record names
another store, with one line naming both::

    regproxy: storage error: this replica's store /data (id 3f2c...) is not the store of the
    replicas already on this Redis: s3://cache/eu (id 9a1b..., replica 0c4e...); give each
    store its own Redis (or database: redis://host/1), or point this replica at that store

The identity of a directory is a random id in ``<root>/store-id``, created once with ``O_EXCL``
(so replicas starting together on an empty shared volume agree); of a bucket, its
``s3://BUCKET/PREFIX``. Moving a fleet to another store means another Redis database in the same
change, or stopping the old replicas first (their record expires a minute after the last one).
A replica that starts while Redis is away checks when it comes back, and logs an error each
refresh if it then finds another store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from storage.content import ContentStore
from storage.errors import StorageError
from storage.filesystem import FilesystemDriver
from storage.redis import key

log = logging.getLogger(__name__)

ID_FILE = "store-id"
CLAIM_TTL_MS = 60_000
REFRESH_EVERY = 20.0


class StoreMismatch(StorageError):
    """This replica's store is not the one the replicas already on its Redis use."""


async def store_identity(store: ContentStore) -> tuple[str, str]:
    """``(id, description)`` of the store: the same for every replica that uses it."""
    driver = store.driver
    if isinstance(driver, FilesystemDriver):
        return await asyncio.to_thread(_directory_id, driver.root), driver.location
    return hashlib.sha256(driver.location.encode()).hexdigest()[:16], driver.location


def _directory_id(root: Path) -> str:
    path = root / ID_FILE
    deadline = time.monotonic() + 5
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            text = path.read_text().strip()
            if text or time.monotonic() > deadline:
                return text or "unreadable"
            time.sleep(0.02)  # its creator is writing it now
            continue
        except OSError as exc:
            raise StorageError(f"cannot create {ID_FILE}: {exc.strerror}", path=str(path)) from exc
        ident = secrets.token_hex(8)
        with os.fdopen(fd, "w") as handle:
            handle.write(ident + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return ident


class StoreClaim:
    """This replica's record of its store in Redis; see the module docstring."""

    def __init__(self, client: aioredis.Redis, ident: str, description: str, instance: str) -> None:
        self.client = client
        self.ident = ident
        self.description = description
        self.instance = instance
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Claim or confirm the record: True if done, False if Redis is away. Raises
        StoreMismatch when a live record names another store."""
        value = json.dumps({"id": self.ident, "store": self.description, "instance": self.instance})
        try:
            if await self.client.set(key("store"), value, nx=True, px=CLAIM_TTL_MS):
                return True
            raw = await self.client.get(key("store"))
            try:
                other = json.loads(raw) if raw is not None else {}
            except ValueError:
                other = {}
            if raw is not None and other.get("id") != self.ident:
                raise StoreMismatch(
                    f"this replica's store {self.description} (id {self.ident}) is not the "
                    f"store of the replicas already on this Redis: {other.get('store', '?')} "
                    f"(id {other.get('id', '?')}, replica {other.get('instance', '?')}); give "
                    "each store its own Redis (or database: redis://host/1), or point this "
                    "replica at that store"
                )
            await self.client.pexpire(key("store"), CLAIM_TTL_MS)
            return True
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("cannot record the store in redis error=%s", exc)
            return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            try:
                await self.check()
            except StoreMismatch as exc:
                log.error("%s", exc)
