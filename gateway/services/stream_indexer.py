"""The stream indexer: one consumer of the category topics that keeps the SQL stream index current.

Its consumer group is named after the index (the database), so gateways that share a database share
the work, and a gateway with a database of its own indexes everything itself. Offsets live in the
database with the rows (see adapters/sql/stream_index.py), and `wait_for` lets a caller wait until the
index has applied a partition up to an offset: event-driven here, polling the database as a fallback
when another gateway indexes that partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from gateway.adapters.kafka import ConsumerRunner, Record
from gateway.adapters.sql import StreamIndex
from gateway.domain.events import parse_event
from gateway.services.progress import Progress
from gateway.settings import KafkaSettings

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
_FETCH_OVERRIDES: dict[str, Any] = {"fetch.wait.max.ms": 50, "topic.metadata.refresh.interval.ms": 5000}


class StreamIndexer:
    def __init__(self, kafka: KafkaSettings, index: StreamIndex, *, topics: Sequence[str]) -> None:
        self.index = index
        self._progress = Progress()
        self._runner = ConsumerRunner(
            kafka,
            group_id=f"kpg-stream-index-{index.index_id()}",
            topics=topics,
            handler=self._apply,
            start_offsets=index.progress,
            on_positions=self._advance,
            batch_size=1000,
            retry_backoff_s=0.2,
            **_FETCH_OVERRIDES,
        )

    async def start(self) -> None:
        await self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()

    async def _apply(self, records: Sequence[Record]) -> None:
        events = []
        positions: dict[TopicPartition, int] = {}
        for r in records:
            positions[(r.topic, r.partition)] = r.offset + 1
            event = parse_event(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp_ms)
            if event is not None:
                events.append(event)
        await asyncio.to_thread(self.index.apply, events, positions)
        self._progress.notify()

    async def _advance(self, positions: dict[TopicPartition, int]) -> None:
        # Positions past transaction markers (no rows to index there).
        await asyncio.to_thread(self.index.apply, [], positions)
        self._progress.notify()

    async def wait_for(self, topic: str, partition: int, offset: int, timeout_s: float) -> bool:
        """Wait until the index has applied `partition` up to (not including) `offset`."""
        key = (topic, partition)

        async def reached() -> bool:
            return (await asyncio.to_thread(self.index.progress, [key]))[key] >= offset

        return await self._progress.wait_until(reached, timeout_s)
