"""Waiting for a consumer to reach a position, without every waiter polling the database."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping
from typing import Generic, TypeVar

from gateway.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class Progress(Generic[K]):
    """Where consumers stand, for callers waiting until positions are applied (read-your-writes).

    Invariants:
    - An offset is known here only once everything below it is committed to the database with its data
      (a local consumer reports it after committing, or the database says so): a waiter told "reached"
      finds the data there.
    - Known offsets only grow; a key names what they are offsets of (e.g. a table and a partition).
    - However many callers wait, one poller reads the stored offsets of every key anyone waits on: at
      once when a new waiter comes, then every `recheck_s` while anyone waits, and never when nobody
      does. That covers partitions another process or instance applies; local reports wake waiters at
      once, with no I/O."""

    def __init__(
        self, read_stored: Callable[[Collection[K]], Awaitable[Mapping[K, int]]], recheck_s: float = 0.02
    ) -> None:
        self._read_stored = read_stored
        self._recheck_s = recheck_s
        self._known: dict[K, int] = {}
        self._advanced = asyncio.Event()
        self._waiting: Counter[K] = Counter()
        self._new_waiter = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    def applied(self, offsets: Mapping[K, int]) -> None:
        """A local consumer committed everything below these offsets: wake the waiters."""
        for key, offset in offsets.items():
            if offset > self._known.get(key, -1):
                self._known[key] = offset
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()

    def _reached(self, targets: Mapping[K, int]) -> bool:
        return all(self._known.get(key, -1) >= offset for key, offset in targets.items())

    async def wait_for(self, targets: Mapping[K, int], timeout_s: float) -> bool:
        """True as soon as every key has reached its target offset; False if they still have not after
        `timeout_s`."""
        if self._reached(targets):
            return True
        self._waiting.update(targets.keys())
        self._new_waiter.set()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="progress-poller")
        try:
            async with asyncio.timeout(timeout_s):
                while not self._reached(targets):
                    await self._advanced.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting.subtract(targets.keys())
            self._waiting = +self._waiting  # drop keys nobody waits on

    async def _poll(self) -> None:
        """Read the stored offsets of the waited keys while anyone waits (see the class doc)."""
        while self._waiting:
            self._new_waiter.clear()
            try:
                self.applied(await self._read_stored(list(self._waiting)))
            except Exception as exc:
                raise_if_cancelling()
                log.debug("reading stored progress failed: %s", exc)  # waiters time out if it lasts
            try:
                await asyncio.wait_for(self._new_waiter.wait(), self._recheck_s)
            except TimeoutError:
                pass
