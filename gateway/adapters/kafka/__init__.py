"""The only package that imports confluent_kafka. Driver errors become `BackendUnavailable` here."""

from gateway.adapters.kafka.admin import KafkaAdmin, TopicSpec, kafka_answers
from gateway.adapters.kafka.config import LOW_LATENCY_CONSUMER
from gateway.adapters.kafka.consumer import ConsumerRunner, DeadLetter, FailurePolicy
from gateway.adapters.kafka.producer import AsyncProducer
from gateway.adapters.kafka.records import Delivery, Header, Record
from gateway.adapters.kafka.scanner import PartitionScanner
from gateway.adapters.kafka.tail import TopicTail
from gateway.adapters.kafka.transactional import (
    OutcomeUnknown,
    OutRecord,
    RecordsRejected,
    TransactionAborted,
    TransactionalProducer,
    WriterFenced,
)

__all__ = [
    "LOW_LATENCY_CONSUMER",
    "AsyncProducer",
    "ConsumerRunner",
    "DeadLetter",
    "Delivery",
    "FailurePolicy",
    "Header",
    "KafkaAdmin",
    "OutRecord",
    "OutcomeUnknown",
    "PartitionScanner",
    "Record",
    "RecordsRejected",
    "TopicSpec",
    "TopicTail",
    "TransactionAborted",
    "TransactionalProducer",
    "WriterFenced",
    "kafka_answers",
]
