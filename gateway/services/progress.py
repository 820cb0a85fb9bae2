"""Waiting for a consumer to reach a position, without polling in a tight loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Progress:
    """Wakes waiters whenever a local consumer has applied something; a waiter re-checks then, and every
    `recheck_s` as well, for progress that another instance (sharing the database) made."""

    def __init__(self, recheck_s: float = 0.1) -> None:
        self._recheck_s = recheck_s
        self._advanced = asyncio.Event()

    def notify(self) -> None:
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()

    async def wait_until(self, reached: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
        """True as soon as `reached()` is; False if it is still not after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    advanced = self._advanced  # taken before checking, so no notification slips between
                    if await reached():
                        return True
                    try:
                        await asyncio.wait_for(advanced.wait(), self._recheck_s)
                    except TimeoutError:
                        pass
        except TimeoutError:
            return False
