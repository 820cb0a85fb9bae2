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
from collections.abc import Collection, Sequence
from typing import Any

from gateway.adapters.kafka import ConsumerRunner, FailurePolicy, Record
from gateway.adapters.sql import StreamIndex
from gateway.domain.dead_letters import replayed_for
from gateway.domain.events import parse_event
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.progress import Progress
from gateway.settings import KafkaSettings

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
_FETCH_OVERRIDES: dict[str, Any] = {"fetch.wait.max.ms": 50}


class StreamIndexer:
    """Invariants: `start()` is idempotent (one consumer loop, however often start-up is retried); the
    loop never dies (ConsumerRunner's policy: outages rewind and back off, a record that cannot be
    indexed goes to `<topic>.DLT` before the index moves past it)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        index: StreamIndex,
        *,
        topics: Sequence[str],
        dead_letters: DeadLetterWriter,
    ) -> None:
        self.index = index
        self._kafka = kafka
        self._topics = list(topics)
        self._dead_letters = dead_letters
        self._progress: Progress[TopicPartition] = Progress(self._stored_progress)
        self._runner: ConsumerRunner | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:
            if self._runner is None:
                await asyncio.to_thread(self.index.ensure_tables)
                index_id = await asyncio.to_thread(self.index.index_id)
                self._runner = ConsumerRunner(
                    self._kafka,
                    group_id=f"kpg-stream-index-{index_id}",
                    topics=self._topics,
                    handler=self._apply,
                    policy=FailurePolicy(dead_letter=self._dead_letters),
                    start_offsets=self.index.progress,
                    on_positions=self._advance,
                    batch_size=1000,
                    **_FETCH_OVERRIDES,
                )
            await self._runner.start()

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._runner is not None:
            await self._runner.stop(timeout_s)

    async def _apply(self, records: Sequence[Record]) -> None:
        events = []
        positions: dict[TopicPartition, int] = {}
        for r in records:
            positions[(r.topic, r.partition)] = r.offset + 1
            event = parse_event(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp_ms)
            if event is not None and replayed_for(r.headers) is None:  # a replay is no new event
                events.append(event)
        await asyncio.to_thread(self.index.apply, events, positions)
        self._progress.applied(positions)

    async def _advance(self, positions: dict[TopicPartition, int]) -> None:
        # Positions past transaction markers (no rows to index there).
        await asyncio.to_thread(self.index.apply, [], positions)
        self._progress.applied(positions)

    async def wait_for(self, topic: str, partition: int, offset: int, timeout_s: float) -> bool:
        """Wait until the index has applied `partition` up to (not including) `offset`."""
        return await self._progress.wait_for({(topic, partition): offset}, timeout_s)

    async def read_side_progress(
        self, partitions: Collection[TopicPartition]
    ) -> dict[str, dict[TopicPartition, int]]:
        """Where the index stands on `partitions`, for back-pressure (services/read_lag.py)."""
        return {"the stream index": await self._stored_progress(partitions)}

    async def _stored_progress(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        return await asyncio.to_thread(self.index.progress, partitions)
