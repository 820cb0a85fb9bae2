"""Take part in the gateway's sagas from Python: run a step's command (or compensation) and reply.

    participant = Participant(
        "inventory.commands", bootstrap_servers="127.0.0.1:9092", dedupe=SqliteDedupe("inventory.sqlite3")
    )

    @participant.handler("ReserveStock")
    async def reserve(command: SagaCommand) -> dict[str, str]:
        if command.input.get("quantity", 1) > 100:
            raise StepFailed(f"out of stock: {command.input.get('sku')}")
        return {"reservation_id": await reserve_stock(command.input, key=command.message_id)}

    await participant.run()  # until cancelled

Needs confluent-kafka (`pip install kpg-client[participant]`). The wire format is the contract's (API.md,
"Saga commands"): the command's type is the `kpg-message-type` header; the reply goes to `kpg-reply-topic`
keyed by the saga id, echoing `kpg-correlation-id` and `kpg-message-id`, with the JSON value
`{"ok": true, "data": {...}}` or `{"ok": false, "error": "why"}`.

Invariants:
- A handler runs at most once per `kpg-message-id` (given the dedupe store): its outcome, success or
  failure, is stored before the reply is sent, and every later copy of that message id (a re-send by the
  orchestrator, a re-delivery after a crash) gets the stored reply without calling the handler. Copies
  arriving together wait for the first one (one lock per message id in this process).
- At-least-once: a batch's offsets are committed only after its replies were acknowledged (acks=all).
  A crash re-delivers the batch, never loses a command; a handler cut off before its outcome was stored
  runs again, so make its side effects idempotent on `message_id`.
- The commands of one batch run concurrently (at most `max_concurrency`); the next batch is fetched once
  the whole batch is answered and committed, so a slow handler holds up the commands behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

log = logging.getLogger(__name__)

__all__ = [
    "Dedupe",
    "MemoryDedupe",
    "Participant",
    "SagaCommand",
    "SqliteDedupe",
    "StepFailed",
    "StoredOutcome",
]


@dataclass(frozen=True)
class SagaCommand:
    """One command (or compensation) of a saga step, as the orchestrator sent it."""

    saga_id: str
    saga_type: str
    step: str  # the step's name in the saga definition
    command: str  # the command or compensation name (`kpg-message-type`): picks the handler
    kind: str  # "command" or "compensation"
    input: Mapping[str, Any]  # the saga's input
    results: Mapping[str, Any]  # each finished step's name -> its reply data
    message_id: str  # the same on every re-send of this command: the dedupe key
    correlation_id: str
    reply_topic: str
    topic: str
    partition: int
    offset: int
    headers: Mapping[str, bytes] = field(repr=False)
    # When the orchestrator sent this copy (the record's timestamp, epoch ms); None if the record has none.
    sent_at_ms: int | None = None


class StepFailed(Exception):
    """Raise in a handler to reply `{"ok": false, "error": <message>}`: the step failed for a business
    reason, and the orchestrator compensates the steps before it."""


@dataclass(frozen=True)
class StoredOutcome:
    """What a handler's run came to; replayed as the reply to every copy of its message id."""

    ok: bool
    data: Mapping[str, Any] = field(default_factory=dict)  # {} on failure
    error: str | None = None  # None on success

    @classmethod
    def success(cls, data: Mapping[str, Any] | None) -> StoredOutcome:
        """Raises TypeError or ValueError when `data` is not a JSON object (then the step fails instead)."""
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"a handler returns a mapping or None, not {type(data).__name__}")
        # A JSON round trip: checks the data now and keeps no reference to the handler's own dict.
        return cls(True, json.loads(json.dumps(dict(data or {}), allow_nan=False)))

    @classmethod
    def failure(cls, error: str) -> StoredOutcome:
        return cls(False, {}, error)

    def to_json(self) -> str:
        """The reply's value: the same text for equal outcomes, so every copy gets an identical reply."""
        body = {"ok": True, "data": self.data} if self.ok else {"ok": False, "error": self.error or ""}
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredOutcome:
        body = json.loads(text)
        if body["ok"]:
            return cls(True, body.get("data") or {})
        return cls.failure(str(body.get("error", "")))


class Dedupe(Protocol):
    """Where outcomes are kept by message id. `put` is called once per message id (under its lock)."""

    async def get(self, message_id: str) -> StoredOutcome | None: ...

    async def put(self, message_id: str, outcome: StoredOutcome) -> None: ...


class MemoryDedupe:
    """Outcomes in memory, the `max_entries` most recently used kept (a restart forgets them all)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._outcomes: OrderedDict[str, StoredOutcome] = OrderedDict()

    async def get(self, message_id: str) -> StoredOutcome | None:
        outcome = self._outcomes.get(message_id)
        if outcome is not None:
            self._outcomes.move_to_end(message_id)
        return outcome

    async def put(self, message_id: str, outcome: StoredOutcome) -> None:
        self._outcomes[message_id] = outcome
        self._outcomes.move_to_end(message_id)
        while len(self._outcomes) > self._max_entries:
            self._outcomes.popitem(last=False)

    def __len__(self) -> int:
        return len(self._outcomes)


class SqliteDedupe:
    """Outcomes in a SQLite file: they survive a restart of the participant (and a crash: each `put` is
    committed with synchronous=FULL before the reply is sent). Outcomes older than `retention_s` are
    pruned now and then; a copy arriving later than that runs its handler again.

    Calls run on one thread of its own, off the event loop. One process per file: processes sharing a
    file share the outcomes, but not the per-message-id lock."""

    _PRUNE_EVERY = 1000  # puts

    def __init__(self, path: str | os.PathLike[str], *, retention_s: float = 7 * 24 * 3600) -> None:
        self._retention_s = retention_s
        self._puts = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kpg-dedupe")
        # Opened here, then used only on self._thread (hence check_same_thread=False).
        self._db = sqlite3.connect(os.fspath(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outcomes"
            " (message_id TEXT PRIMARY KEY, outcome TEXT NOT NULL, stored_at REAL NOT NULL)"
        )
        self._prune()

    async def get(self, message_id: str) -> StoredOutcome | None:
        row = await self._call(self._select, message_id)
        return None if row is None else StoredOutcome.from_json(row)

    async def put(self, message_id: str, outcome: StoredOutcome) -> None:
        await self._call(self._insert, message_id, outcome.to_json())

    def close(self) -> None:
        self._thread.submit(self._db.close).result()
        self._thread.shutdown()

    def __enter__(self) -> SqliteDedupe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _select(self, message_id: str) -> str | None:
        row = self._db.execute("SELECT outcome FROM outcomes WHERE message_id = ?", (message_id,)).fetchone()
        return None if row is None else cast(str, row[0])

    def _insert(self, message_id: str, outcome: str) -> None:
        # The first outcome stays: another process sharing the file may have stored one meanwhile.
        self._db.execute(
            "INSERT INTO outcomes (message_id, outcome, stored_at) VALUES (?, ?, ?)"
            " ON CONFLICT (message_id) DO NOTHING",
            (message_id, outcome, time.time()),
        )
        self._puts += 1
        if self._puts % self._PRUNE_EVERY == 0:
            self._prune()

    def _prune(self) -> None:
        self._db.execute("DELETE FROM outcomes WHERE stored_at < ?", (time.time() - self._retention_s,))


Handler = Callable[[SagaCommand], Awaitable[Mapping[str, Any] | None]]
H = TypeVar("H", bound=Handler)

# A reply that fails with one of these can never be delivered: it is dropped (and logged) rather than
# retried forever; the orchestrator's step timeout takes over. Any other failure is retried.
_UNDELIVERABLE = frozenset(
    {
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
    }
)
_FLUSH_TIMEOUT_S = 30.0
_BACKOFF_S, _MAX_BACKOFF_S = 0.2, 5.0


class Participant:
    """Consumes saga commands from `topic` and answers each with the handler registered for its type.

    `dedupe` (default: a `MemoryDedupe`) is where outcomes are kept; pass a `SqliteDedupe` for them to
    survive a restart. `config` adds librdkafka settings to both the consumer and the producer (security,
    for instance). A new consumer group starts at the earliest offset, so commands sent while it was
    joining are answered."""

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str,
        group_id: str | None = None,
        dedupe: Dedupe | None = None,
        max_concurrency: int = 100,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.topic = topic
        self.group_id = group_id or f"kpg-participant-{topic}"
        self._bootstrap_servers = bootstrap_servers
        self._dedupe: Dedupe = dedupe if dedupe is not None else MemoryDedupe()
        self._max_concurrency = max_concurrency
        self._config = dict(config or {})
        self._handlers: dict[str, Handler] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # message id -> (lock, holders + waiters)

    def handler(self, command_type: str) -> Callable[[H], H]:
        """Register `async def fn(command: SagaCommand) -> Mapping | None` for commands (or compensations)
        of `command_type`. What it returns is the reply's `data`; StepFailed or any other exception fails
        the step."""

        def register(fn: H) -> H:
            if command_type in self._handlers:
                raise ValueError(f"a handler for {command_type} is registered already")
            self._handlers[command_type] = fn
            return fn

        return register

    async def run(
        self,
        ready: asyncio.Event | None = None,
        on_receive: Callable[[SagaCommand], object] | None = None,
    ) -> None:
        """Consume and answer commands until cancelled. `ready` is set once the consumer has partitions;
        `on_receive(command)` is called for every command received, copies included (before dedupe).

        The loop never dies on a Kafka or dedupe-store error: it rewinds to the batch's first command and
        backs off (cancellation aside)."""
        loop = asyncio.get_running_loop()
        # librdkafka clients are driven from this one thread; rebalances happen only inside consume(), so
        # the assignment cannot change between fetching a batch and committing (or rewinding) it.
        kafka_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kpg-participant-{self.topic}")
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap_servers,
                "group.id": self.group_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,  # committed by _settle, after the replies are acknowledged
                "fetch.wait.max.ms": 5,
                "socket.nagle.disable": True,
                **self._config,
            }
        )
        producer = Producer(
            {
                "bootstrap.servers": self._bootstrap_servers,
                "linger.ms": 0,
                "socket.nagle.disable": True,
                "acks": "all",
                # Kafka's (Java's) key hashing, as the gateway's: a reply keyed by saga id lands on the
                # partition whose gateway drives that saga (others are forwarded there, one hop more).
                "partitioner": "murmur2_random",
                **self._config,
            }
        )

        def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if ready is not None and partitions:
                loop.call_soon_threadsafe(ready.set)

        def on_kafka_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
            return loop.run_in_executor(kafka_thread, fn, *args)

        failures = 0
        try:
            await on_kafka_thread(lambda: consumer.subscribe([self.topic], on_assign=on_assign))
            while True:
                try:
                    messages = await on_kafka_thread(_consume_ready, consumer, self._max_concurrency)
                    if messages and not await self._answer_batch(
                        messages, consumer, producer, on_kafka_thread, on_receive
                    ):
                        await on_kafka_thread(_rewind, consumer, messages)
                        raise _BatchNotAnswered
                    failures = 0
                except Exception as exc:
                    _raise_if_cancelling()
                    failures += 1
                    if not isinstance(exc, _BatchNotAnswered):
                        log.exception("participant %s: unexpected failure; retrying", self.topic)
                    await asyncio.sleep(min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (failures - 1)))
        finally:
            # Replies produced so far still go out; the uncommitted batch is re-delivered to the next owner.
            with contextlib.suppress(Exception):
                await on_kafka_thread(producer.flush, 5)
            with contextlib.suppress(Exception):
                await on_kafka_thread(consumer.close)
            kafka_thread.shutdown(wait=False)

    async def _answer_batch(
        self,
        messages: Sequence[Message],
        consumer: Consumer,
        producer: Producer,
        on_kafka_thread: Callable[..., Awaitable[Any]],
        on_receive: Callable[[SagaCommand], object] | None,
    ) -> bool:
        """Answer a batch and commit it. False (nothing committed) when a reply could not be delivered
        or an outcome could not be read or stored: the caller rewinds."""
        commands = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("participant %s: %s", self.topic, error.str())
                continue
            command = parse_command(message)
            if command is None:
                log.warning(
                    "participant %s: skipping %s[%d]@%d: not a saga command (it needs kpg-message-id,"
                    " kpg-reply-topic and a JSON object value)",
                    self.topic,
                    message.topic(),
                    message.partition(),
                    message.offset(),
                )
                continue
            if on_receive is not None:
                try:
                    on_receive(command)
                except Exception:
                    log.exception("participant %s: on_receive failed for %s", self.topic, command.message_id)
            commands.append(command)

        undelivered: list[tuple[SagaCommand, KafkaError]] = []
        results = await asyncio.gather(
            *(self._answer(command, producer, undelivered) for command in commands), return_exceptions=True
        )
        answered = True
        for command, result in zip(commands, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, KeyboardInterrupt | SystemExit):
                    raise result
                answered = False
                log.error(
                    "participant %s: no outcome for %s (%s); the batch will be retried",
                    self.topic,
                    command.message_id,
                    result,
                    exc_info=result,
                )
        if not answered:
            return False
        settled: bool = await on_kafka_thread(_settle, consumer, producer, messages, undelivered)
        return settled

    async def _answer(
        self, command: SagaCommand, producer: Producer, undelivered: list[tuple[SagaCommand, KafkaError]]
    ) -> None:
        outcome = await self._outcome(command)
        value = outcome.to_json().encode()
        headers: list[tuple[str, str | bytes | None]] = [
            ("kpg-correlation-id", command.headers.get("kpg-correlation-id") or b""),
            ("kpg-message-id", command.headers["kpg-message-id"]),
            ("kpg-saga-id", command.saga_id.encode()),
            ("content-type", b"application/json"),
        ]

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:  # on the Kafka thread, during _settle's flush
                undelivered.append((command, error))

        try:
            producer.produce(
                command.reply_topic,
                value,
                key=command.saga_id.encode() or None,
                headers=headers,
                on_delivery=delivered,
            )
        except KafkaException as exc:
            undelivered.append((command, exc.args[0]))
        except BufferError:
            undelivered.append((command, KafkaError(KafkaError._QUEUE_FULL)))

    async def _outcome(self, command: SagaCommand) -> StoredOutcome:
        """The stored outcome of this message id, or the handler's (stored before it is returned)."""
        async with self._lock(command.message_id):
            stored = await self._dedupe.get(command.message_id)
            if stored is not None:
                log.info(
                    "participant %s: %s %s for saga %s answered again from the dedupe store",
                    self.topic,
                    command.command,
                    command.message_id,
                    command.saga_id,
                )
                return stored
            outcome = await self._execute(command)
            await self._dedupe.put(command.message_id, outcome)
            return outcome

    async def _execute(self, command: SagaCommand) -> StoredOutcome:
        handler = self._handlers.get(command.command)
        if handler is None:
            log.warning("participant %s: no handler for %r", self.topic, command.command)
            return StoredOutcome.failure(f"no handler for {command.command}")
        try:
            return StoredOutcome.success(await handler(command))
        except StepFailed as exc:
            log.info(
                "participant %s: %s for saga %s failed: %s", self.topic, command.command, command.saga_id, exc
            )
            return StoredOutcome.failure(str(exc))
        except Exception as exc:
            _raise_if_cancelling()
            log.exception(
                "participant %s: %s for saga %s raised", self.topic, command.command, command.saga_id
            )
            return StoredOutcome.failure(f"{type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def _lock(self, message_id: str) -> AsyncIterator[None]:
        """One lock per message id, dropped when nobody holds or waits for it."""
        lock, users = self._locks.get(message_id) or (asyncio.Lock(), 0)
        self._locks[message_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[message_id]
            if users == 1:
                del self._locks[message_id]
            else:
                self._locks[message_id] = (lock, users - 1)


def parse_command(message: Message) -> SagaCommand | None:
    """The saga command in a consumed record, or None when it is not one (no kpg-message-id, no
    kpg-reply-topic, or a value that is not a JSON object)."""
    raw = cast("list[tuple[str, bytes | None]]", message.headers() or [])
    headers = {name: value or b"" for name, value in raw}
    message_id = headers.get("kpg-message-id", b"").decode(errors="replace")
    reply_topic = headers.get("kpg-reply-topic", b"").decode(errors="replace")
    if not message_id or not reply_topic:
        return None
    try:
        body = json.loads(message.value() or b"")
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None

    def text(header: str, name: str) -> str:
        value = headers.get(header)
        return value.decode(errors="replace") if value else str(body.get(name) or "")

    key = message.key()
    saga_id = text("kpg-saga-id", "saga_id") or (
        key.decode(errors="replace") if isinstance(key, bytes) else ""
    )
    return SagaCommand(
        saga_id=saga_id,
        saga_type=text("kpg-saga-type", "saga_type"),
        step=text("kpg-saga-step", "step"),
        command=text("kpg-message-type", "command"),
        kind=str(body.get("kind") or "command"),
        input=_object(body.get("input")),
        results=_object(body.get("results")),
        message_id=message_id,
        correlation_id=headers.get("kpg-correlation-id", b"").decode(errors="replace"),
        reply_topic=reply_topic,
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        headers=headers,
        sent_at_ms=_sent_at(message),
    )


def _sent_at(message: Message) -> int | None:
    kind, timestamp = message.timestamp()
    return timestamp if kind == TIMESTAMP_CREATE_TIME and timestamp > 0 else None


def _object(value: object) -> dict[str, Any]:
    return cast("dict[str, Any]", value) if isinstance(value, dict) else {}


class _BatchNotAnswered(Exception):
    """A batch was rewound (its cause is logged already): back off, then fetch it again."""


def _raise_if_cancelling() -> None:
    """A driver error raised while this task was being cancelled is the cancellation."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _consume_ready(consumer: Consumer, max_messages: int) -> list[Message]:
    """What is there now, else the first message within 100 ms and what came with it (a batch
    `consume(n, timeout)` would wait for n messages or the whole timeout, adding it to every command's
    latency)."""
    messages = consumer.consume(max_messages, 0)
    if not messages:
        messages = consumer.consume(1, 0.1)
        if messages and max_messages > 1:
            messages += consumer.consume(max_messages - 1, 0)
    return messages


def _settle(
    consumer: Consumer,
    producer: Producer,
    messages: Sequence[Message],
    undelivered: list[tuple[SagaCommand, KafkaError]],
) -> bool:
    """On the Kafka thread: wait for the batch's replies, then commit its offsets. False, committing
    nothing, when a reply is still unacknowledged or failed for a reason that may pass."""
    if producer.flush(_FLUSH_TIMEOUT_S) > 0:
        log.warning(
            "participant: replies not acknowledged within %.0fs; the batch will be retried", _FLUSH_TIMEOUT_S
        )
        return False
    retry = False
    for command, error in undelivered:
        if error.code() in _UNDELIVERABLE:
            log.error(
                "participant: reply to %s for %s dropped, it cannot be delivered: %s",
                command.reply_topic,
                command.message_id,
                error.str(),
            )
        else:
            log.warning(
                "participant: reply for %s not delivered (%s); retrying", command.message_id, error.str()
            )
            retry = True
    if retry:
        return False
    offsets: dict[tuple[str, int], int] = {}
    for message in messages:
        if message.error() is None:
            offsets[(message.topic() or "", message.partition() or 0)] = (message.offset() or 0) + 1
    if offsets:
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:  # answered all the same: a redelivery gets the stored replies
            log.warning("participant: commit failed (%s); the batch may be delivered again", exc)
    return True


def _rewind(consumer: Consumer, messages: Sequence[Message]) -> None:
    """Seek each partition back to its first record in the batch: it is fetched again."""
    first: dict[tuple[str, int], int] = {}
    for message in messages:
        if message.error() is None:
            first.setdefault((message.topic() or "", message.partition() or 0), message.offset() or 0)
    for (topic, partition), offset in first.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:  # not ours any more: its next owner starts at the committed offset
            log.warning("participant: cannot rewind %s[%d] to %d: %s", topic, partition, offset, exc)
