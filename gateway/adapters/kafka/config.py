"""librdkafka configuration built from the frozen KafkaSettings."""

from __future__ import annotations

import logging
from typing import Any

from gateway.settings import KafkaSettings

# librdkafka's own log lines go through Python logging (and so the gateway's JSON logs).
LIBRDKAFKA_LOGGER = logging.getLogger("gateway.kafka.librdkafka")


def base_config(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "socket.nagle.disable": True,
        "logger": LIBRDKAFKA_LOGGER,
        **settings.extra,
    }


def producer_config(settings: KafkaSettings) -> dict[str, Any]:
    return {
        **base_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.linger_ms,
        "compression.type": "lz4",
        # Topics are created up front (auto-creation is off), so a topic missing from metadata for a
        # few seconds is missing for real: report it then, not after the 30 s default.
        "topic.metadata.propagation.max.ms": 3000,
        "delivery.timeout.ms": settings.delivery_timeout_ms,
        # Above librdkafka's 1,000,000-byte default: an event at the 1 MiB limit, or its dead letter with
        # the error headers, must not be refused by the client.
        "message.max.bytes": settings.max_record_bytes,
        "request.timeout.ms": min(settings.request_timeout_ms, settings.delivery_timeout_ms),
        **settings.extra,
    }


# For consumers on a reply path (request-reply, saga replies): short fetch waits, no Nagle; latency over
# batching. Heartbeats every 500 ms: a member learns of a rebalance (an instance or worker joining or
# leaving) at its next heartbeat, and replies wait until every member has rejoined, so with the default
# 2 s interval a join stalled replies for seconds. Passed as `ConsumerRunner` overrides.
LOW_LATENCY_CONSUMER: dict[str, Any] = {
    "fetch.wait.max.ms": 5,
    "socket.nagle.disable": True,
    "heartbeat.interval.ms": 500,
}


def consumer_config(settings: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        # A crashed instance's partitions move to the others after this (Kafka's default is 45 s).
        "session.timeout.ms": settings.consumer_session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.consumer_session_timeout_ms // 5),
        # Metadata changes (partitions added to a subscribed topic) reach the group within seconds, not the
        # default 5 minutes. (A subscribed topic that does not exist yet is looked up again sooner anyway:
        # measured at about 2 s; this was once suspected of a saga stall, wrongly.)
        "topic.metadata.refresh.interval.ms": 5000,
        **overrides,
        **settings.extra,
    }
