"""`PartitionScanner`: reads one partition's committed records between two offsets, on demand.

The event store's writers use it when they take a partition: what the log holds past the stream index's
progress is read from the log itself, so taking a partition never waits for a consumer's lag. One
consumer (no group, read_committed) serves every scan in turn, so a scan costs a fetch, not a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from gateway.adapters.kafka.config import consumer_config
from gateway.adapters.kafka.consumer import to_record
from gateway.adapters.kafka.records import Record
from gateway.adapters.kafka.threads import close_on_thread, on_client_thread
from gateway.errors import BackendUnavailable
from gateway.settings import KafkaSettings

T = TypeVar("T")
CHUNK = 2000


class PartitionScanner:
    def __init__(self, settings: KafkaSettings) -> None:
        self._config = consumer_config(
            settings,
            "kpg-scanner-unused",  # never joins the group: partitions are assigned by hand
            **{
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,
                # A start below the log's first offset means history was deleted: an error, never a jump.
                "auto.offset.reset": "error",
            },
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-scanner")
        self._consumer: Consumer | None = None
        self._lock = asyncio.Lock()

    async def scan(
        self, topic: str, partition: int, start: int, end: int, *, timeout_s: float
    ) -> AsyncGenerator[list[Record], None]:
        """The committed records at offsets [start, end), in order and in chunks (aborted records and
        transaction markers are skipped). `end` must not be past the last stable offset. Fails with
        BackendUnavailable when the range cannot be read within `timeout_s`."""
        if start >= end:
            return
        deadline = asyncio.get_running_loop().time() + timeout_s  # waiting for the scanner counts too
        async with self._lock:
            await self._call(self._assign, topic, partition, start)
            try:
                while True:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        raise BackendUnavailable(
                            f"reading {topic}[{partition}] from {start} to {end} took over {timeout_s:.0f}s",
                            metadata={"topic": topic, "partition": str(partition)},
                        )
                    records, done = await self._call(self._read, topic, partition, end, min(remaining, 1.0))
                    if records:
                        yield records
                    if done:
                        return
            finally:
                await self._call(self._unassign)

    def _assign(self, topic: str, partition: int, start: int) -> None:
        if self._consumer is None:
            self._consumer = Consumer(self._config)
        self._consumer.assign([TopicPartition(topic, partition, start)])

    def _unassign(self) -> None:
        if self._consumer is not None:
            self._consumer.unassign()

    def _read(self, topic: str, partition: int, end: int, timeout_s: float) -> tuple[list[Record], bool]:
        """(records below `end`, whether the scan reached `end`)."""
        assert self._consumer is not None
        out: list[Record] = []
        # What is fetched already, else wait for the first message (never for a whole chunk).
        messages = self._consumer.consume(CHUNK, 0) or self._consumer.consume(1, timeout_s)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    return out, True  # at the last stable offset, which is at or past `end`
                if error.fatal() or error.code() in (
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    KafkaError._UNKNOWN_TOPIC,
                    KafkaError.OFFSET_OUT_OF_RANGE,
                    KafkaError._AUTO_OFFSET_RESET,
                ):
                    raise KafkaException(error)
                continue
            if (message.offset() or 0) >= end:
                return out, True
            out.append(to_record(message))
        position = self._consumer.position([TopicPartition(topic, partition)])[0].offset
        return out, position >= end

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        await close_on_thread(self._executor, consumer)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await on_client_thread(self._executor, "scanning an event partition", fn, *args)
