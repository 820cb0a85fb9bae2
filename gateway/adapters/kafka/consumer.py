"""`ConsumerRunner`: every consumer the gateway runs goes through here.

The confluent-kafka consumer lives on one dedicated thread; the runner fetches batches with
`consume(n)`, awaits the async handler, and only then commits the batch's offsets (at-least-once,
never ahead of processing). A handler failure rewinds to the start of the batch and retries after a
backoff, so nothing is skipped; later the dead-letter policy plugs in at `_handle`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from gateway.adapters.kafka.config import consumer_config
from gateway.adapters.kafka.records import Record
from gateway.adapters.kafka.threads import consume_ready, on_client_thread
from gateway.errors import BackendUnavailable
from gateway.settings import KafkaSettings

log = logging.getLogger(__name__)

BatchHandler = Callable[[Sequence[Record]], Awaitable[None]]
TopicPartitionKey = tuple[str, int]
# Where to start each newly assigned partition, when the offsets live with the data (not in Kafka).
StartOffsets = Callable[[list[TopicPartitionKey]], dict[TopicPartitionKey, int]]
PositionsHandler = Callable[[dict[TopicPartitionKey, int]], Awaitable[None]]


class ConsumerRunner:
    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group_id: str,
        topics: Sequence[str],
        handler: BatchHandler,
        batch_size: int = 500,
        poll_timeout_s: float = 0.2,
        linger_s: float = 0.05,
        synchronous_commit: bool = True,
        retry_backoff_s: float = 0.5,
        start_offsets: StartOffsets | None = None,
        on_positions: PositionsHandler | None = None,
        **overrides: Any,
    ) -> None:
        self.group_id = group_id
        self.topics = list(topics)
        self._handler = handler
        self._batch_size = batch_size
        self._poll_timeout_s = poll_timeout_s
        # After the first record of a batch, wait this long for more (see consume_ready).
        self._linger_s = linger_s
        # False: commit in the background (a lost commit means a redelivery, for handlers that shrug it off).
        self._synchronous_commit = synchronous_commit
        self._retry_backoff_s = retry_backoff_s
        # With start_offsets the handler stores its offsets with its data, so Kafka commits are not used.
        self._start_offsets = start_offsets
        self._on_positions = on_positions
        self._positions: dict[TopicPartitionKey, int] = {}
        self._config = consumer_config(settings, group_id, **overrides)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-consumer-{group_id}")
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.assignment: set[tuple[str, int]] = set()

    async def start(self) -> None:
        """Create the consumer, subscribe, and start consuming in the background."""
        await self._call(self._open)
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group_id}")

    async def stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group and close."""
        self._stopping = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._call(self._consumer.close)
            self._consumer = None
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await on_client_thread(self._executor, f"Kafka consumer {self.group_id}", fn, *args)

    def _open(self) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    # Rebalance callbacks run on the consumer thread inside consume(); by then the previous batch is
    # processed and committed, so revoking loses nothing and hands over no uncommitted work.
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        if self._start_offsets is not None and partitions:
            offsets = self._start_offsets([(tp.topic, tp.partition) for tp in partitions])
            for tp in partitions:
                tp.offset = offsets.get((tp.topic, tp.partition), OFFSET_BEGINNING)
            consumer.incremental_assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment -= {(tp.topic, tp.partition) for tp in partitions}
        for tp in partitions:
            self._positions.pop((tp.topic, tp.partition), None)
        if self._start_offsets is not None and partitions:
            consumer.incremental_unassign(partitions)

    def _consume(self) -> list[Record]:
        assert self._consumer is not None
        messages = consume_ready(self._consumer, self._batch_size, self._poll_timeout_s, self._linger_s)
        records = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal():
                    raise KafkaException(error)
                log.warning("consumer %s: %s", self.group_id, error.str())
                continue
            records.append(to_record(message))
        return records

    def _changed_positions(self) -> dict[TopicPartitionKey, int]:
        """Positions that moved since last asked: past records, and past transaction markers too."""
        assert self._consumer is not None
        assigned = [TopicPartition(t, p) for t, p in self.assignment]
        changed = {}
        for tp in self._consumer.position(assigned) if assigned else []:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0 and self._positions.get(key) != tp.offset:
                changed[key] = self._positions[key] = tp.offset
        return changed

    def _commit(self, records: Sequence[Record]) -> None:
        assert self._consumer is not None
        if self._start_offsets is not None:
            return
        offsets = {(r.topic, r.partition): r.offset + 1 for r in records}
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if self._synchronous_commit:
            self._consumer.commit(offsets=partitions, asynchronous=False)
        else:
            self._consumer.commit(offsets=partitions, asynchronous=True)

    def _rewind(self, records: Sequence[Record]) -> None:
        assert self._consumer is not None
        first: dict[tuple[str, int], int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        for (topic, partition), offset in first.items():
            if (topic, partition) in self.assignment:
                self._consumer.seek(TopicPartition(topic, partition, offset))

    async def _run(self) -> None:
        while not self._stopping:
            try:
                records = await self._call(self._consume)
                if records:
                    await self._handle(records)
                if self._on_positions is not None:
                    changed = await self._call(self._changed_positions)
                    if changed:
                        await self._on_positions(changed)
            except BackendUnavailable as exc:
                # A failed commit means redelivery, never a skip: processing is at-least-once.
                log.error("%s; retrying", exc)
                await asyncio.sleep(self._retry_backoff_s)

    async def _handle(self, records: Sequence[Record]) -> None:
        try:
            await self._handler(records)
        except Exception:
            log.exception("consumer %s: handler failed; retrying the batch", self.group_id)
            await self._call(self._rewind, records)
            await asyncio.sleep(self._retry_backoff_s)
            return
        await self._call(self._commit, records)


def to_record(message: Message) -> Record:
    _, timestamp = message.timestamp()
    key = message.key()
    value = message.value()
    # A consumed message's headers are a list of (name, bytes) pairs, or None.
    raw_headers = cast("list[tuple[str, bytes | None]]", message.headers() or [])
    return Record(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=key.encode() if isinstance(key, str) else key,
        value=value.encode() if isinstance(value, str) else value,
        headers=tuple((name, header or b"") for name, header in raw_headers),
        timestamp_ms=timestamp if timestamp and timestamp > 0 else None,
    )
