"""The one writer of dead letters for every consumer the gateway runs (see ConsumerRunner's policy).

A record that keeps failing goes to `<topic>.DLT` with its own key, value and headers plus the contract's
`kpg-dlt-*` headers. `__call__` returns only once Kafka acknowledged the dead letter (else it raises
BackendUnavailable), so a consumer never moves past a failure that is not recorded.
"""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime

from prometheus_client import Counter

from gateway.adapters.kafka import AsyncProducer, Record
from gateway.domain.dead_letters import Failure, dlt_headers, dlt_topic

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "kpg_dead_letters_written_total",
    "Records written to a dead-letter topic",
    ["dlt_topic", "consumer_group"],
)


class DeadLetterWriter:
    def __init__(self, producer: AsyncProducer) -> None:
        self._producer = producer

    async def __call__(
        self, record: Record, error: BaseException, attempts: int, consumer_group: str
    ) -> None:
        cause = error.__cause__ or error
        failure = Failure(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            consumer_group=consumer_group,
            error_class=f"{type(cause).__module__}.{type(cause).__qualname__}",
            error_message=str(error),
            stack_trace="".join(traceback.format_exception(cause)),
            attempts=attempts,
            failed_at=datetime.now(UTC),
        )
        target = dlt_topic(record.topic)
        log.warning(
            "%s: record %s[%d]@%d failed %d times, sent to %s: %s",
            consumer_group,
            record.topic,
            record.partition,
            record.offset,
            attempts,
            target,
            error,
        )
        await self._producer.produce(
            target, record.value, key=record.key, headers=dlt_headers(record.headers, failure)
        )
        DEAD_LETTERS.labels(target, consumer_group).inc()
