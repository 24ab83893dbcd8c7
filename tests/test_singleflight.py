"""Coalescing: one task per key; every waiter gets the result or the error."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.singleflight import SingleFlight


async def test_one_call_many_waiters() -> None:
    calls = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    flight: SingleFlight[str, int] = SingleFlight()
    waiters = [asyncio.create_task(flight.run("k", work)) for _ in range(12)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiters) == [42] * 12
    assert calls == 1
    assert "k" not in flight


async def test_every_waiter_sees_the_error() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    flight: SingleFlight[str, int] = SingleFlight()
    results = await asyncio.gather(
        *(flight.run("k", work) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_cancelled_waiter_does_not_cancel_the_work() -> None:
    done = asyncio.Event()

    async def work() -> str:
        await asyncio.sleep(0.05)
        done.set()
        return "ok"

    flight: SingleFlight[str, str] = SingleFlight()
    first = asyncio.create_task(flight.run("k", work))
    second = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "ok"
    assert done.is_set()
