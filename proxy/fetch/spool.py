"""How bytes reach a download's writer: :class:`Spool` batches them through a worker thread;
:func:`chunks` reads an aiohttp body as it arrives; :func:`taken` hands a threaded GET's body to
:class:`proxy.fetch.rawbody.BodyCopy`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from proxy.core.errors import UpstreamContentError
from proxy.fetch import rawbody, threadget
from proxy.fetch.download import BATCH_MAX, Download
from storage.writer import SpoolWriter


async def chunks(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's bytes as they arrived from the socket: no joining copy, no fixed size.

    When the connection broke, the bytes that came before the break are yielded before the
    error is raised (a resume starts after them).
    """
    while True:
        try:
            chunk, _ = await stream.readchunk()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            raise  # the bytes aiohttp held past the last chunk are fetched again on resume
        if chunk:
            yield chunk
        elif stream.at_eof():
            return


def taken(resp: threadget.Response, length: int) -> rawbody.Taken:
    """The body of a threaded GET's response of ``length`` bytes, for a body copy: what came
    with the head, then the rest from its connection (none when all came with the head, or
    more than announced, which the copy refuses)."""
    buffered = [resp.buffered] if resp.buffered else []
    remaining = length - len(resp.buffered)
    if remaining <= 0:
        resp.release(remaining == 0)
        return rawbody.Taken(buffered, None, 0)
    return rawbody.Taken(buffered, threadget.BodySource(resp), remaining)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # a discarded batch's failure is not news: the download failed first


class Spool:
    """Feeds a download's writer: one batch is hashed and written in a worker thread while the
    next one is read, and followers are woken once per batch rather than once per chunk.

    ``dl.written`` (what followers may send) advances only when a batch is in the file.
    """

    def __init__(self, dl: Download) -> None:
        assert dl.writer is not None
        self.dl = dl
        self.writer = dl.writer
        self.batch: list[bytes] = []
        self.queued = 0
        self.task: asyncio.Task[None] | None = None
        self.in_flight = 0

    async def add(self, chunk: bytes) -> None:
        dl = self.dl
        if dl.size is not None and dl.written + self.in_flight + self.queued + len(chunk) > dl.size:
            raise UpstreamContentError(
                f"{dl.source} sent more bytes than announced", upstream=dl.upstream.name
            )
        self.batch.append(chunk)
        self.queued += len(chunk)
        if self.task is not None:
            if not self.task.done() and self.queued < BATCH_MAX:
                return  # keep reading while the thread works
            await self._land()
        self._start()

    async def flush(self) -> None:
        """Wait until everything added is in the file (and counted in ``dl.written``)."""
        if self.task is not None:
            await self._land()
        if self.batch:
            self._start()
            await self._land()

    def discard(self) -> None:
        """Stop a batch still in flight (after a failure); its bytes never count. (The writer
        closes its file only once a thread's append has ended.)"""
        task, self.task = self.task, None
        self.batch, self.queued = [], 0
        if task is not None and not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)

    def _start(self) -> None:
        batch, self.batch = self.batch, []
        self.in_flight, self.queued = self.queued, 0
        writer = self.writer
        if isinstance(writer, SpoolWriter):
            self.task = asyncio.ensure_future(writer.write_chunks(batch))
        else:
            self.task = asyncio.ensure_future(writer.write(b"".join(batch)))

    async def _land(self) -> None:
        task, self.task = self.task, None
        assert task is not None
        await task
        self.dl.written += self.in_flight
        self.in_flight = 0
        self.dl.notify()
