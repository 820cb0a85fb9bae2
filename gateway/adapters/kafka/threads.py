"""Blocking confluent-kafka calls, run off the event loop on the client's own thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message

from gateway.errors import BackendUnavailable

T = TypeVar("T")


async def on_client_thread(executor: Executor, what: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `executor` (one thread per client: librdkafka clients are not shared across
    threads here); a KafkaException becomes BackendUnavailable naming `what`."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    except KafkaException as exc:
        raise BackendUnavailable(f"{what}: {exc.args[0].str()}") from exc


async def close_on_thread(executor: ThreadPoolExecutor, consumer: Consumer | None) -> None:
    """Close a consumer on its own thread, then let the thread go (never waiting for it to exit)."""
    if consumer is not None:
        await asyncio.get_running_loop().run_in_executor(executor, consumer.close)
    executor.shutdown(wait=False)


def consume_ready(
    consumer: Consumer, max_messages: int, timeout_s: float, linger_s: float = 0.01
) -> list[Message]:
    """Up to `max_messages` messages soon after the first one arrives (waiting at most `timeout_s` for it).

    librdkafka's batch `consume(n, timeout)` returns only with n messages or at the timeout, which would add
    the whole timeout to the latency of every quiet moment. This waits for the first message, then lingers
    `linger_s` for more, as a producer's linger.ms does: a few milliseconds of latency buy batches big
    enough that a busy gateway does not spend itself on tiny database transactions."""
    messages = consumer.consume(max_messages, 0)
    if len(messages) >= max_messages:
        return messages
    if not messages:
        messages = consumer.consume(1, timeout_s)
        if not messages:
            return []
    return messages + consumer.consume(max_messages - len(messages), linger_s)
