"""`AsyncProducer`: confluent-kafka's producer behind an async wall.

Idempotent, `acks=all`, batched by librdkafka. `produce` returns only when the broker acknowledged the
record: the delivery report, served by a dedicated poll thread, resolves an asyncio future through
`loop.call_soon_threadsafe`. A record that cannot be delivered within `delivery_timeout_ms` fails with
`BackendUnavailable`, never silently.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from gateway.adapters.kafka.config import producer_config
from gateway.adapters.kafka.records import Delivery, Header
from gateway.errors import BackendUnavailable, GatewayError, NotFound, PayloadTooLarge
from gateway.settings import KafkaSettings

log = logging.getLogger(__name__)


class AsyncProducer:
    def __init__(self, settings: KafkaSettings, **overrides: Any) -> None:
        self._settings = settings
        self._producer = Producer({**producer_config(settings), **overrides, "error_cb": self._on_error})
        self._running = True
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-producer-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while self._running:
            self._producer.poll(0.1)

    @staticmethod
    def _on_error(error: KafkaError) -> None:
        # Connection trouble is reported per record through delivery reports; this is for the log.
        log.warning("kafka producer: %s", error)

    async def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | str | None = None,
        headers: Sequence[Header] = (),
        partition: int | None = None,
    ) -> Delivery:
        """Produce one record and wait for the broker's acknowledgement."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            loop.call_soon_threadsafe(_resolve, future, error, message)

        kwargs: dict[str, Any] = {"key": key, "headers": list(headers), "on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        await self._enqueue(topic, value, kwargs)
        return await future

    async def produce_many(
        self, topic: str, records: Sequence[tuple[bytes | str | None, bytes | None, Sequence[Header]]]
    ) -> list[Delivery]:
        """Produce several records in order (key, value, headers) and wait for every acknowledgement."""
        deliveries = [
            asyncio.ensure_future(self.produce(topic, value, key=key, headers=headers))
            for key, value, headers in records
        ]
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Delivery)]

    async def _enqueue(self, topic: str, value: bytes | None, kwargs: dict[str, Any]) -> None:
        deadline = asyncio.get_running_loop().time() + self._settings.delivery_timeout_ms / 1000
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                return
            except BufferError as exc:
                # The local queue is full: wait for deliveries to drain it rather than buffer without bound.
                if asyncio.get_running_loop().time() > deadline:
                    raise BackendUnavailable(
                        "Kafka producer queue stayed full: the broker is not keeping up"
                    ) from exc
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                raise delivery_error(exc.args[0], topic) from exc

    async def flush(self, timeout_s: float = 10.0) -> int:
        """Wait for every queued record to be delivered; returns how many are still queued."""
        return int(await asyncio.to_thread(self._producer.flush, timeout_s))

    async def close(self, timeout_s: float = 10.0) -> None:
        remaining = await self.flush(timeout_s)
        if remaining:
            log.error("kafka producer closed with %d undelivered records", remaining)
        self._running = False
        await asyncio.to_thread(self._poller.join)


def _resolve(future: asyncio.Future[Delivery], error: KafkaError | None, message: Message) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(delivery_error(error, message.topic() or ""))
        return
    _, timestamp = message.timestamp()
    future.set_result(
        Delivery(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            timestamp_ms=timestamp if timestamp and timestamp > 0 else None,
        )
    )


def delivery_error(error: KafkaError, topic: str) -> GatewayError:
    """The contract's error for a failed delivery: the caller's mistake, or the backend's."""
    code = error.code()
    if code in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
        return NotFound(f"topic {topic!r} does not exist", metadata={"topic": topic})
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return PayloadTooLarge(
            f"the record is larger than topic {topic!r} accepts", metadata={"topic": topic}
        )
    return BackendUnavailable(f"Kafka did not acknowledge the record for {topic!r}: {error.str()}")
