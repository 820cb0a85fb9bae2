"""`TopicTail`: reads partitions from given offsets onwards, on demand, for one subscriber.

No consumer group: offsets come from the subscriber's position. It fetches only when asked, so a slow
subscriber makes it wait instead of buffering: memory stays bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from gateway.adapters.kafka.config import consumer_config
from gateway.adapters.kafka.consumer import to_record
from gateway.adapters.kafka.records import Record
from gateway.adapters.kafka.threads import close_on_thread, consume_ready, on_client_thread
from gateway.settings import KafkaSettings

T = TypeVar("T")


class TopicTail:
    def __init__(self, settings: KafkaSettings, topic: str, start: Mapping[int, int | None]) -> None:
        """`start`: partition -> first offset to read (None = the beginning)."""
        self._config = consumer_config(
            settings,
            "kpg-tail-unused",
            **{
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 100,
                "queued.max.messages.kbytes": 2048,  # bounded prefetch per subscriber
            },
        )
        self._topic = topic
        self._start = dict(start)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tail-{topic}")
        self._consumer: Consumer | None = None

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.assign(
            [
                TopicPartition(self._topic, p, OFFSET_BEGINNING if o is None else o)
                for p, o in self._start.items()
            ]
        )

    async def read(self, max_records: int = 500, timeout_s: float = 0.5) -> list[Record]:
        """The next records (possibly none within the timeout)."""
        return await self._call(self._read, max_records, timeout_s)

    def _read(self, max_records: int, timeout_s: float) -> list[Record]:
        assert self._consumer is not None
        out = []
        for message in consume_ready(self._consumer, max_records, timeout_s):
            error = message.error()
            if error is None:
                out.append(to_record(message))
            elif error.fatal() or error.code() in (
                KafkaError.UNKNOWN_TOPIC_OR_PART,
                KafkaError._UNKNOWN_TOPIC,
            ):
                raise KafkaException(error)
        return out

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        await close_on_thread(self._executor, consumer)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await on_client_thread(self._executor, f"reading {self._topic}", fn, *args)
