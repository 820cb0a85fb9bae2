"""Progress: read-your-writes waits answered from local reports, with one shared poller of stored offsets."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import pytest

from gateway.services.progress import Progress


class Stored:
    """Stored offsets another process moves, and the reads made of them."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self.reads: list[list[str]] = []

    async def __call__(self, keys: Collection[str]) -> dict[str, int]:
        self.reads.append(sorted(keys))
        return {k: self.offsets.get(k, 0) for k in keys}


async def test_a_local_report_wakes_the_waiter() -> None:
    stored = Stored()
    progress: Progress[str] = Progress(stored, recheck_s=10)
    waiter = asyncio.create_task(progress.wait_for({"p0": 5}, 5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    progress.applied({"p0": 4})
    await asyncio.sleep(0.01)
    assert not waiter.done()
    progress.applied({"p0": 5})
    assert await asyncio.wait_for(waiter, 1)
    assert len(stored.reads) == 1  # the read when it began; the report needed none


async def test_offsets_another_process_stores_are_found_by_the_poller() -> None:
    stored = Stored()
    progress: Progress[str] = Progress(stored, recheck_s=0.01)
    waiter = asyncio.create_task(progress.wait_for({"p0": 3, "p1": 2}, 5))
    await asyncio.sleep(0.05)
    stored.offsets.update(p0=3)
    await asyncio.sleep(0.05)
    assert not waiter.done()
    stored.offsets.update(p1=2)
    assert await asyncio.wait_for(waiter, 1)
    reads = len(stored.reads)
    await asyncio.sleep(0.1)
    assert len(stored.reads) == reads  # nobody waits: no more reads


async def test_many_waiters_share_one_read_per_tick() -> None:
    stored = Stored()
    progress: Progress[str] = Progress(stored, recheck_s=0.05)
    waiters = [asyncio.create_task(progress.wait_for({f"p{i % 3}": 1}, 5)) for i in range(60)]
    await asyncio.sleep(0.3)
    assert 2 <= len(stored.reads) <= 12  # a poll per tick (and per burst of new waiters), not per waiter
    assert stored.reads[-1] == ["p0", "p1", "p2"]
    stored.offsets.update(p0=1, p1=1, p2=1)
    assert all(await asyncio.wait_for(asyncio.gather(*waiters), 1))


async def test_a_wait_times_out_and_a_cancelled_waiter_is_forgotten() -> None:
    stored = Stored()
    progress: Progress[str] = Progress(stored, recheck_s=0.01)
    assert not await progress.wait_for({"p0": 1}, 0.05)
    waiter = asyncio.create_task(progress.wait_for({"p1": 1}, 5))
    await asyncio.sleep(0.03)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.05)
    reads = len(stored.reads)
    await asyncio.sleep(0.05)
    assert len(stored.reads) == reads


async def test_known_offsets_only_grow_and_a_reached_target_needs_no_read() -> None:
    stored = Stored()
    progress: Progress[str] = Progress(stored)
    progress.applied({"p0": 7})
    progress.applied({"p0": 3})  # an older report (or a stale stored read) never moves it back
    assert await progress.wait_for({"p0": 7}, 0.01)
    assert stored.reads == []
