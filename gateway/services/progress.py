"""Waiting for a consumer to reach a position, without polling the database in a tight loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Progress(Generic[K]):
    """Where the local consumers stand, for callers waiting until positions are applied.

    Invariants:
    - A local consumer reports (`applied`) only offsets already committed to the database with its
      data, so a waiter told "reached" finds the data there.
    - A waiter is woken by every report and answers from the reported offsets, with no I/O: a busy
      gateway does not read the database once per waiter per batch.
    - It also reads the stored progress (`stored`) when it starts and every `recheck_s`, which covers
      partitions another instance (sharing the database) applies.
    Reported offsets only grow; a key names what they are offsets of (e.g. a table and a partition)."""

    def __init__(self, recheck_s: float = 0.1) -> None:
        self._recheck_s = recheck_s
        self._advanced = asyncio.Event()
        self._applied: dict[K, int] = {}

    def applied(self, offsets: Mapping[K, int]) -> None:
        """A local consumer committed everything below these offsets; wake the waiters."""
        for key, offset in offsets.items():
            if offset > self._applied.get(key, -1):
                self._applied[key] = offset
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()

    async def wait_for(
        self,
        targets: Mapping[K, int],
        stored: Callable[[], Awaitable[Mapping[K, int]]],
        timeout_s: float,
    ) -> bool:
        """True as soon as every key has reached its target offset (reported here, or stored); False if
        they still have not after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                read_stored = True
                while True:
                    advanced = self._advanced  # taken before checking, so no report slips between
                    if all(self._applied.get(key, -1) >= offset for key, offset in targets.items()):
                        return True
                    if read_stored:
                        found = await stored()
                        if all(found.get(key, 0) >= offset for key, offset in targets.items()):
                            return True
                    try:
                        await asyncio.wait_for(advanced.wait(), self._recheck_s)
                        read_stored = False
                    except TimeoutError:
                        read_stored = True
        except TimeoutError:
            return False
