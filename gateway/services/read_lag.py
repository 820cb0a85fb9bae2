"""Back-pressure from the read side: appends to a partition the read side is too far behind are refused.

The stream index and the projections keep up with appends at any rate this gateway sustains, but a read
side can still fall behind without bound (a slow Python handler, a database that crawls). Rather than
let read-your-writes waits grow to minutes, an append to a partition whose read side is more than
`max_read_lag` records behind fails at once with RATE_LIMITED (retry_after_ms), until it catches up.

Invariants:
- **The write path never waits on the read side.** It reads a number this process refreshes in the
  background (every `refresh_s`, for the partitions it writes): no I/O per append, and a read side that
  is down or slow to answer only makes the number older.
- **What counts:** every registered read side of the partition's topic (the stream index; the active
  table of each read model of the category). A read side counts only once it has been within the bound
  on that partition: a new read model replaying a long history, or a rebuild, never blocks writers.
- **Lag** = the partition's end as its writer knew it when a refresh began minus where the read side
  stood in that refresh, in records (transaction markers included). Both are taken together, so a stale
  refresh never adds the appends made since to the lag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping

from gateway.errors import RateLimited
from gateway.tasks import raise_if_cancelling, stop_task

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
IDLE_S = 10.0
# Where a read side stands on partitions: a name (for errors and logs) -> next offset, per partition.
ProgressSource = Callable[[Collection[TopicPartition]], Awaitable[Mapping[str, Mapping[TopicPartition, int]]]]


class ReadLag:
    def __init__(self, *, max_lag: int, refresh_s: float = 0.5) -> None:
        self.max_lag = max_lag  # 0: no bound
        self._refresh_s = refresh_s
        self._sources: list[ProgressSource] = []
        self._lags: dict[TopicPartition, dict[str, int]] = {}  # per partition: read side -> records behind
        self._armed: set[tuple[str, TopicPartition]] = set()  # (read side, partition) within the bound once
        self._ends: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._checked_at = 0.0

    def register(self, source: ProgressSource) -> None:
        self._sources.append(source)

    def check(self, tp: TopicPartition, end: int | None) -> None:
        """Record `end` (the partition's end as its writer knows it now) for the next refresh, and raise
        RATE_LIMITED if a read side of `tp` that counts was more than `max_lag` records behind at the last
        refresh (lags are taken there, see the module doc). No I/O."""
        if not self.max_lag or end is None:
            return
        self._ends[tp] = end
        self._checked_at = time.monotonic()
        if self._task is None or self._task.done():
            self._lags = {}  # what it knew before an idle pause is stale: no refusal until refreshed
            self._task = asyncio.create_task(self._refresh_loop(), name="read-lag")
        for side, lag in self._lags.get(tp, {}).items():
            if lag > self.max_lag and (side, tp) in self._armed:
                raise RateLimited(
                    f"{side} is {lag} records behind {tp[0]}[{tp[1]}] (more than {self.max_lag}): "
                    "appends there wait until it catches up",
                    retry_after_ms=max(100, int(1000 * self._refresh_s)),
                    metadata={
                        "topic": tp[0],
                        "partition": str(tp[1]),
                        "read_side": side,
                        "lag": str(lag),
                    },
                )

    async def _refresh_loop(self) -> None:
        """Refresh while appends come (it stops after IDLE_S without one; the next append restarts it)."""
        while self._ends and time.monotonic() - self._checked_at < IDLE_S:
            try:
                await self.refresh()
            except Exception as exc:
                raise_if_cancelling()
                log.debug("reading the read side's progress failed: %s", exc)
            await asyncio.sleep(self._refresh_s)

    async def refresh(self) -> None:
        """Read where every read side stands on the partitions written here, and which of them count."""
        ends = dict(self._ends)
        lags: dict[TopicPartition, dict[str, int]] = {tp: {} for tp in ends}
        for source in self._sources:
            for side, offsets in (await source(list(ends))).items():
                for tp, offset in offsets.items():
                    if tp in lags:
                        lags[tp][side] = max(0, ends[tp] - offset)
                        if lags[tp][side] <= self.max_lag:
                            self._armed.add((side, tp))
        self._lags = lags

    async def close(self) -> None:
        self._ends.clear()
        await stop_task(self._task, 2.0)
