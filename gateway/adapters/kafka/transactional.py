"""`TransactionalProducer`: one transactional.id, one writer at a time, fenced by the broker.

Creating it with a transactional.id that another process is using fences that process (its next
produce or commit fails) and aborts any transaction it left open. So whoever initialised last is the
only one who can write, whatever Redis says; a transaction is committed whole or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from gateway.adapters.kafka.config import producer_config
from gateway.adapters.kafka.producer import delivery_error
from gateway.adapters.kafka.records import Delivery, Header
from gateway.errors import BackendUnavailable, GatewayError
from gateway.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class WriterFenced(BackendUnavailable):
    """Another writer took over the transactional.id; this producer can no longer write.
    Its last transaction was aborted (not visible to read_committed readers), so a retry is safe."""


class OutcomeUnknown(BackendUnavailable):
    """The commit's outcome is unknown (it may or may not be in the log): state must be re-read."""


class TransactionAborted(BackendUnavailable):
    """The transaction was aborted (nothing of it is in the log) for a reason that is no record's fault:
    sending it again is safe."""


class RecordsRejected(TransactionAborted):
    """Kafka refused some records of the transaction for what they are (too large, for example); the
    transaction was aborted, so nothing of it is in the log. `rejected` maps each refused record's index
    to the caller's error; the other records are innocent and may be sent again."""

    def __init__(self, message: str, rejected: dict[int, GatewayError]) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[Header]


class TransactionalProducer:
    def __init__(
        self, settings: KafkaSettings, transactional_id: str, *, transaction_timeout_ms: int
    ) -> None:
        self.transactional_id = transactional_id
        self._settings = settings
        self._config = {
            **producer_config(settings),
            "transactional.id": transactional_id,
            "transaction.timeout.ms": transaction_timeout_ms,
            "delivery.timeout.ms": min(settings.delivery_timeout_ms, transaction_timeout_ms),
            "linger.ms": 0,  # the writer batches whole transactions itself
            "retry.backoff.ms": 10,
        }
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"txn-{transactional_id}")
        self._producer: Producer | None = None

    async def init(self, timeout_s: float) -> None:
        await self._run(self._init, timeout_s)

    def _init(self, timeout_s: float) -> None:
        self._producer = Producer(self._config)
        self._producer.init_transactions(timeout_s)

    async def send(self, records: Sequence[OutRecord], timeout_s: float) -> list[Delivery]:
        """Write the records in one transaction; returns their deliveries in order once committed."""
        return await self._run(self._send, records, timeout_s)

    def _send(self, records: Sequence[OutRecord], timeout_s: float) -> list[Delivery]:
        producer = self._producer
        assert producer is not None, "init() first"
        deliveries: list[Delivery | GatewayError | None] = [None] * len(records)

        def on_delivery(index: int) -> Callable[[KafkaError | None, Message], None]:
            def report(error: KafkaError | None, message: Message) -> None:
                if error is not None:
                    deliveries[index] = delivery_error(error, message.topic() or "")
                else:
                    _, ts = message.timestamp()
                    deliveries[index] = Delivery(
                        message.topic() or "",
                        message.partition() or 0,
                        message.offset() or 0,
                        ts if ts > 0 else None,
                    )

            return report

        producer.begin_transaction()
        try:
            refused: dict[int, GatewayError] = {}
            for i, r in enumerate(records):
                try:
                    producer.produce(
                        r.topic,
                        r.value,
                        key=r.key,
                        headers=list(r.headers),
                        partition=r.partition,
                        on_delivery=on_delivery(i),
                    )
                except KafkaException as exc:  # refused locally (too large, for example)
                    if exc.args[0].fatal() or exc.args[0].code() == KafkaError._FENCED:
                        raise
                    refused[i] = delivery_error(exc.args[0], r.topic)
            if refused:
                raise self._reject(producer, refused)
            self._commit(producer, timeout_s)
        except KafkaException as exc:
            raise self._failed(producer, exc.args[0], deliveries) from exc
        out = []
        for delivery in deliveries:
            if not isinstance(delivery, Delivery):  # committed, so every record was delivered
                raise OutcomeUnknown(
                    f"{self.transactional_id}: commit returned without every delivery report"
                )
            out.append(delivery)
        return out

    def _reject(self, producer: Producer, refused: dict[int, GatewayError]) -> GatewayError:
        try:
            producer.abort_transaction(10)
        except KafkaException as abort_error:
            self._producer = None
            return OutcomeUnknown(f"{self.transactional_id}: abort failed: {abort_error.args[0].str()}")
        return RecordsRejected(f"{self.transactional_id}: {len(refused)} record(s) refused", refused)

    @staticmethod
    def _commit(producer: Producer, timeout_s: float) -> None:
        for _ in range(3):
            try:
                producer.commit_transaction(timeout_s)
                return
            except KafkaException as exc:
                if not exc.args[0].retriable():
                    raise
                log.warning("commit of a transaction failed retriably: %s; retrying", exc.args[0])
        producer.commit_transaction(timeout_s)

    def _failed(
        self, producer: Producer, error: KafkaError, deliveries: Sequence[Delivery | GatewayError | None]
    ) -> GatewayError:
        if error.fatal() or error.code() == KafkaError._FENCED:
            self._producer = None
            return WriterFenced(f"{self.transactional_id}: fenced by a newer writer ({error.str()})")
        if error.txn_requires_abort():
            try:
                producer.abort_transaction(10)
            except KafkaException as abort_error:
                self._producer = None
                return OutcomeUnknown(f"{self.transactional_id}: abort failed: {abort_error.args[0].str()}")
            # Records refused for what they are fail their own append; the others did nothing wrong.
            refused = {
                i: d
                for i, d in enumerate(deliveries)
                if isinstance(d, GatewayError) and not isinstance(d, BackendUnavailable)
            }
            if refused:
                return RecordsRejected(f"{self.transactional_id}: {len(refused)} record(s) refused", refused)
            return TransactionAborted(f"Kafka transaction aborted: {error.str()}")
        # A commit that timed out may have succeeded: the only safe answer is to re-read the log.
        self._producer = None
        return OutcomeUnknown(f"{self.transactional_id}: commit outcome unknown: {error.str()}")

    @property
    def usable(self) -> bool:
        return self._producer is not None

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, producer.flush, 5)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError._FENCED or error.fatal():
                self._producer = None
                raise WriterFenced(f"{self.transactional_id}: {error.str()}") from exc
            raise BackendUnavailable(
                f"Kafka transactional producer {self.transactional_id}: {error.str()}"
            ) from exc
