"""A blob body copied into the spool by worker threads, off the event loop.

On a cold blob the proxy's own work is all there is, and aiohttp's way costs most of it: every
~250 KB the event loop runs the HTTP parser, which copies the body into a new ``bytes``, feeds a
stream reader and wakes the download task; over TLS it decrypts every byte first. So the blob GET
is made on a connection a worker thread owns (``proxy.fetch.threadget``), and :class:`BodyCopy`
reads the body from it (a :class:`Source`: ``readv`` on plain TCP, decryption straight into the
buffer over TLS) into reused 1 MiB buffers (up to eight per download) and appends each to the spool,
while a second thread hashes the filled buffers behind it (``SpoolWriter.append(...,
hash_later=True)`` and ``SpoolWriter.hash``; all of them release the GIL). The event loop only
counts the bytes that are in the file (one wake-up at a time) and wakes followers. Memory stays
at most eight buffers per download.

A connection that ends early raises :class:`ConnectionResetError` (the caller resumes with
``Range`` from the last byte counted); silence for ``read_timeout`` raises
:class:`TimeoutError`. Nothing here decides what is committed: the writer still verifies size
and digest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from storage.writer import SpoolWriter

#: Bytes read from the socket per append, and at most this many buffers per download (reused,
#: allocated only when the hash thread falls behind): the reader fills one while the hash thread
#: works through those filled before. Eight absorbed the scheduling jitter of a loaded 2-core
#: machine that four did not (A/B: 417 -> 534 MB/s on a cold 512 MiB blob).
BUFFER = 1024 * 1024
BUFFERS = 8
#: Downloads read this way at once (see :func:`claim`); more are read through aiohttp.
MAX_THREADS = 32
#: A partly filled buffer is appended when the socket runs dry only once it holds this much, or
#: ``FLUSH_AFTER`` seconds after the last append (a slow upstream's bytes still reach clients
#: and the console promptly), or when nothing more came for a poll interval: fewer, larger
#: appends and wake-ups.
FLUSH_MIN = 256 * 1024
FLUSH_AFTER = 0.05
#: How often a waiting thread looks whether it was told to stop.
POLL_MS = 200

_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=MAX_THREADS, thread_name_prefix="regproxy-body"
)
#: Apart, so that a reader never waits for a hash thread stuck behind other readers.
_HASH_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=MAX_THREADS, thread_name_prefix="regproxy-hash"
)
_busy = 0


class Source(Protocol):
    """Where the rest of a body is read from, by the copying thread."""

    def fileno(self) -> int:
        """What to poll for readability."""

    def readinto(self, view: memoryview) -> int:
        """Read into ``view`` now: the count, 0 at the end, BlockingIOError if nothing yet."""

    def finish(self, complete: bool) -> None:
        """Done with it (``complete``: the body was read exactly to its end)."""


@dataclass
class Taken:
    """A response body: what had been read with the head, then ``remaining`` bytes from
    ``source`` (None when the whole body had been read already)."""

    #: What had already been read and parsed, in order.
    buffered: list[bytes]
    source: Source | None
    remaining: int

    @property
    def size(self) -> int:
        """The bytes of the body still to append."""
        return sum(len(c) for c in self.buffered) + self.remaining


def claim() -> bool:
    """Take one of the ``MAX_THREADS`` copy slots (on the event loop); False when none is free.
    Held from the request to the end of the copy, so that no copy ever waits for a thread."""
    global _busy
    if _busy >= MAX_THREADS:
        return False
    _busy += 1
    return True


def release() -> None:
    global _busy
    _busy -= 1


class BodyCopy:
    """Copies a taken body into ``writer`` in a worker thread; ``on_bytes`` runs on the event
    loop (awaited, in order) after each append, with the count of bytes appended."""

    def __init__(
        self,
        taken: Taken,
        writer: SpoolWriter,
        on_bytes: Callable[[int], object],
        read_timeout: float | None,
    ) -> None:
        self.taken = taken
        self.writer = writer
        self.on_bytes = on_bytes
        self.read_timeout = read_timeout
        self._stop = threading.Event()
        self._pending = 0
        self._lock = threading.Lock()
        self._unseen = 0  # appended by the thread, not yet seen by the event loop
        self._woken = False
        self._buffers = 0  # allocated by the reader thread so far
        self._buffer_size = BUFFER
        self._pump: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Copy every remaining byte, or raise (ConnectionResetError, TimeoutError, StorageError).

        Whatever was appended before a failure has been counted when this returns or raises.
        """
        source, self.taken.source = self.taken.source, None
        try:
            if self.taken.buffered:
                await self.writer.write_chunks(self.taken.buffered)
                self.on_bytes(sum(len(c) for c in self.taken.buffered))
                self.taken.buffered = []
            if source is None:
                if self.taken.remaining:
                    raise ConnectionResetError("upstream closed the connection early")
                return
            future = _POOL.submit(self._copy, source, self.taken.remaining)
            source = None  # the thread finishes it
            try:
                await asyncio.wrap_future(future)
            finally:
                self._stop.set()
                await self._drain()
        finally:
            if source is not None:
                source.finish(False)

    def close(self) -> None:
        """Release a taken source that was never copied from."""
        if self.taken.source is not None:
            self.taken.source.finish(False)
            self.taken.source = None

    # -- in the worker thread ------------------------------------------------------------------

    def _copy(self, source: Source, remaining: int) -> None:
        """Read into free buffers and append them; the hash thread hashes them behind us."""
        free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._buffer_size = min(BUFFER, remaining)
        full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        hasher = _HASH_POOL.submit(self._hash, full, free)
        poller = select.poll()
        poller.register(source.fileno(), select.POLLIN | select.POLLPRI)
        idle_ms = 0
        appended_at = time.monotonic()
        limit_ms = None if not self.read_timeout else int(self.read_timeout * 1000)
        try:
            while remaining > 0:
                view = self._free_buffer(free)
                if view is None:
                    return
                want = min(len(view), remaining)
                filled = 0
                broken: BaseException | None = None
                while filled < want and broken is None:
                    if self._stop.is_set():
                        return
                    try:
                        n = source.readinto(view[filled:want])
                    except BlockingIOError:
                        if filled >= FLUSH_MIN or (
                            filled and time.monotonic() - appended_at >= FLUSH_AFTER
                        ):
                            break  # append what came; the rest follows
                        if poller.poll(POLL_MS):
                            idle_ms = 0
                            continue
                        if filled:
                            break  # upstream paused: let followers have what we hold
                        idle_ms += POLL_MS
                        if limit_ms is not None and idle_ms >= limit_ms:
                            broken = TimeoutError("no bytes from upstream")
                        continue
                    except OSError as exc:  # reset by the peer
                        broken = exc
                        continue
                    if n == 0:
                        broken = ConnectionResetError("upstream closed the connection early")
                        continue
                    filled += n
                if filled:  # what came before a break is good: a resume starts after it
                    appended_at = time.monotonic()
                    self.writer.append((view[:filled],), hash_later=True)
                    full.put((view, filled))
                    remaining -= filled
                    self._report(filled)
                if broken is not None:
                    raise broken
        finally:
            full.put(None)
            source.finish(remaining == 0)
            hasher.result()

    def _free_buffer(self, free: queue.SimpleQueue[memoryview]) -> memoryview | None:
        with contextlib.suppress(queue.Empty):
            return free.get_nowait()
        if self._buffers < BUFFERS:
            self._buffers += 1
            return memoryview(bytearray(self._buffer_size))
        while not self._stop.is_set():
            try:
                return free.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
        return None

    def _hash(
        self,
        full: queue.SimpleQueue[tuple[memoryview, int] | None],
        free: queue.SimpleQueue[memoryview],
    ) -> None:
        """Hash what the reader appended, in order, and hand the buffers back."""
        while True:
            item = full.get()
            if item is None:
                return
            view, filled = item
            self.writer.hash(view[:filled])
            free.put(view)

    def _report(self, count: int) -> None:
        # One wake-up of the event loop at a time: counts that land meanwhile ride along.
        with self._lock:
            self._unseen += count
            if self._woken:
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self._landed)

    # -- on the event loop ---------------------------------------------------------------------

    def _landed(self) -> None:
        with self._lock:
            count, self._unseen, self._woken = self._unseen, 0, False
        self._pending += count
        pump = self._pump
        if pump is not None and pump.done() and not pump.cancelled() and pump.exception():
            return  # it failed: keep it for _drain to raise; the thread is stopping
        if pump is None or pump.done():
            self._pump = asyncio.ensure_future(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            while self._pending:
                count, self._pending = self._pending, 0
                await self.writer.appended(count)
                self.on_bytes(count)
        except BaseException:
            self._stop.set()  # the writer failed (an S3 part upload): stop reading
            raise

    async def _drain(self) -> None:
        """Wait until every appended byte was counted; re-raise a failure of the counting."""
        # The thread's last call_soon_threadsafe ran before its future's result was delivered,
        # so the pump holds every count by now.
        if self._pump is not None:
            await self._pump
