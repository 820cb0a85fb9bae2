"""Blocking confluent-kafka calls, run off the event loop on the client's own thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from confluent_kafka import KafkaException

from gateway.errors import BackendUnavailable

T = TypeVar("T")


async def on_client_thread(executor: Executor, what: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `executor` (one thread per client: librdkafka clients are not shared across
    threads here); a KafkaException becomes BackendUnavailable naming `what`."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    except KafkaException as exc:
        raise BackendUnavailable(f"{what}: {exc.args[0].str()}") from exc
