"""Answer requests sent through the gateway's RequestReply service, from Python.

    async def price(request: IncomingRequest) -> bytes:
        return json.dumps({"price": 12}).encode()

    await serve_requests("pricing.quotes", price, bootstrap_servers="127.0.0.1:9092")

Needs confluent-kafka (`pip install kpg-client[responder]`). The reply goes to the request's
`kpg-reply-topic` (or Spring's `kafka_replyTopic`) with its correlation id in `kpg-correlation-id` and
`kafka_correlationId`, so callers of the gateway and Spring's ReplyingKafkaTemplate both match it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, Message, Producer

log = logging.getLogger(__name__)

CORRELATION_HEADERS = ("kpg-correlation-id", "kafka_correlationId")
REPLY_TOPIC_HEADERS = ("kpg-reply-topic", "kafka_replyTopic")


@dataclass(frozen=True)
class IncomingRequest:
    topic: str
    key: bytes | None
    payload: bytes
    headers: Mapping[str, bytes]
    correlation_id: bytes
    reply_topic: str
    deadline_ms: int | None  # epoch ms after which the caller no longer waits (None: not said)


@dataclass(frozen=True)
class Response:
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[IncomingRequest], Awaitable[bytes | Response]]


def _incoming(message: Message) -> IncomingRequest | None:
    headers = dict(cast("list[tuple[str, bytes]]", message.headers() or []))
    correlation = next((headers[h] for h in CORRELATION_HEADERS if headers.get(h)), None)
    reply_topic = next((headers[h] for h in REPLY_TOPIC_HEADERS if headers.get(h)), None)
    if correlation is None or reply_topic is None:
        return None  # not a request: nobody waits for an answer
    deadline = headers.get("kpg-deadline")
    key = message.key()
    value = message.value()
    return IncomingRequest(
        topic=message.topic() or "",
        key=key.encode() if isinstance(key, str) else key,
        payload=(value.encode() if isinstance(value, str) else value) or b"",
        headers=headers,
        correlation_id=correlation,
        reply_topic=reply_topic.decode(),
        deadline_ms=int(deadline) if deadline else None,
    )


def _consume_ready(consumer: Consumer) -> list[Message]:
    """What is there now, else the first message within 100 ms (a batch `consume(n, timeout)` would wait
    for n messages or the whole timeout, adding it to every request's latency)."""
    messages = consumer.consume(100, 0)
    return messages or consumer.consume(1, 0.1)


async def serve_requests(
    topic: str,
    handler: Handler,
    *,
    bootstrap_servers: str,
    group_id: str | None = None,
    max_concurrency: int = 100,
    skip_expired: bool = True,
    ready: asyncio.Event | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Consume requests from `topic` and answer each with `handler`'s result, until cancelled.

    Handlers run concurrently (up to `max_concurrency`). A request whose caller stopped waiting
    (`kpg-deadline` passed) is skipped unless `skip_expired` is False. `ready` is set once the consumer
    has its partitions."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id or f"kpg-responder-{topic}",
            # A new group starts at the beginning: requests sent while it was joining are still answered
            # (those whose caller gave up are skipped, see skip_expired).
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "fetch.wait.max.ms": 5,
            "socket.nagle.disable": True,
            **(config or {}),
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap_servers, "linger.ms": 0, "socket.nagle.disable": True, "acks": "all"}
    )
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_concurrency)
    tasks: set[asyncio.Task[None]] = set()

    def on_assign(_consumer: Consumer, partitions: list[Any]) -> None:
        if ready is not None and partitions:
            loop.call_soon_threadsafe(ready.set)

    async def answer(request: IncomingRequest) -> None:
        try:
            try:
                result = await handler(request)
            except Exception:
                # No reply: the caller gets REPLY_TIMEOUT. Answer with an error payload in the handler instead
                # when the caller should hear about it sooner.
                log.exception("handler failed for request %r on %s", request.correlation_id, request.topic)
                return
            response = result if isinstance(result, Response) else Response(result)
            headers: list[tuple[str, str | bytes | None]] = list(response.headers.items())
            headers += [(name, request.correlation_id) for name in CORRELATION_HEADERS]
            producer.produce(request.reply_topic, response.payload, key=request.key, headers=headers)
            producer.poll(0)
        finally:
            gate.release()

    consumer.subscribe([topic], on_assign=on_assign)
    try:
        while True:
            messages = await loop.run_in_executor(None, _consume_ready, consumer)
            for message in messages:
                if message.error() is not None:
                    continue
                request = _incoming(message)
                if request is None:
                    continue
                if (
                    skip_expired
                    and request.deadline_ms is not None
                    and request.deadline_ms < time.time() * 1000
                ):
                    continue
                await gate.acquire()
                task = asyncio.create_task(answer(request), name=f"answer-{uuid.uuid4().hex[:8]}")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            producer.poll(0)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        await loop.run_in_executor(None, producer.flush, 5)
        await loop.run_in_executor(None, consumer.close)
