"""The patterns this gateway serves, each one registration (the composition layer under `__main__`).

A `Pattern` bundles what the composition root needs of one pattern: the topics it needs, its start once
the backends answer, its stop, its gRPC servicer and its REST router. `serve()` builds the list; the
helpers here run it: `start_patterns` (every topic in one call, then each start in list order),
`stop_patterns` (reverse order, each bounded), `grpc_bindings` and `rest_routers`.

Invariant: adding a pattern = writing its builder (`..._pattern(context)`) and adding it to the list in
`serve()`; nothing else in the composition root changes. Its gRPC placeholder and its planned REST
routes give way by themselves (`transport.grpc.servicers.bindings`, `transport.rest.app.PLANNED_ROUTES`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.adapters.kafka import (
    AsyncProducer,
    KafkaAdmin,
    PartitionScanner,
    TopicSpec,
    TransactionalProducer,
)
from gateway.adapters.peers import Handler as PeerHandler
from gateway.adapters.peers import Peers
from gateway.adapters.redis import ChangeFeed, CorrelationStore, LeaseStore, RedisClient
from gateway.adapters.sql import Database, ReadModelStore, SagaStore, StreamIndex
from gateway.definitions import Definitions
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.dead_letters import DeadLetters
from gateway.services.events import EventStore
from gateway.services.idempotency import Idempotency
from gateway.services.read_lag import ReadLag
from gateway.services.read_models import ReadModels
from gateway.services.request_reply import PEER_REPLY, RequestReply
from gateway.services.sagas import SAGA_CHANGES_CHANNEL, Sagas
from gateway.services.stream_indexer import StreamIndexer
from gateway.settings import Settings
from gateway.tasks import bounded
from gateway.transport.grpc.dead_letters import DeadLettersServicer
from gateway.transport.grpc.sagas import SagasServicer
from gateway.transport.grpc.servicers import (
    EventStoreServicer,
    ReadModelsServicer,
    RequestReplyServicer,
    ServiceBinding,
    bindings,
)
from gateway.transport.rest.app import Router
from gateway.transport.rest.dead_letters import dead_letters_router
from gateway.transport.rest.events import event_store_router
from gateway.transport.rest.read_models import read_models_router
from gateway.transport.rest.request_reply import request_reply_router
from gateway.transport.rest.sagas import sagas_router

log = logging.getLogger("gateway")

# A stop gets the time left and bounds its own steps by it (plus a few seconds to close clients); past
# this much more it is abandoned (logged), a backstop for a stop that overruns.
STOP_SLACK_S = 10.0


def _no_topics() -> list[TopicSpec]:
    return []


@dataclass(frozen=True, slots=True)
class Pattern:
    """One pattern as the composition root sees it.

    `start` runs once the backends answer, after every pattern's topics exist; it is retried after a
    failure, so it must be idempotent. `stop(timeout_s)` gets the time left and should end within it."""

    name: str  # the contract's pattern name, for logs: "append-event"
    service: str  # the gRPC service it implements: "kpg.v1.EventStore"
    servicer: object  # that service's servicer (transport.grpc.servicers)
    router: Router | None = None  # its REST routes (transport.rest)
    topics: Callable[[], list[TopicSpec]] = field(default=_no_topics)
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[float], Awaitable[None]] | None = None
    # Calls the other workers of `kpg serve --workers N` make to this one, by kind (adapters.peers).
    peer_handlers: Mapping[str, PeerHandler] = field(default_factory=dict)


class TopicCreator(Protocol):
    async def ensure_topics(self, specs: Iterable[TopicSpec]) -> list[str]: ...


async def start_patterns(
    patterns: Sequence[Pattern], *, admin: TopicCreator, topics: Iterable[TopicSpec] = ()
) -> None:
    """Create `topics` and every pattern's topics in one call (a later spec of a name wins), then start
    the patterns in list order. A failure propagates: the caller retries the whole, starts included."""
    specs = list(topics)
    for pattern in patterns:
        specs += pattern.topics()
    created = await admin.ensure_topics(specs)
    if created:
        log.info("created topics: %s", ", ".join(sorted(created)))
    for pattern in patterns:
        if pattern.start is not None:
            await pattern.start()


async def stop_patterns(patterns: Sequence[Pattern], *, left: Callable[[], float]) -> None:
    """Stop the patterns in reverse order, each given `left()` seconds and bounded: one that fails or
    hangs is logged and the next one still stops."""
    for pattern in reversed(patterns):
        if pattern.stop is not None:
            timeout_s = left()
            await bounded(
                _call(pattern.stop, timeout_s), timeout_s + STOP_SLACK_S, what=f"stopping {pattern.name}"
            )


async def _call(stop: Callable[[float], Awaitable[None]], timeout_s: float) -> None:
    await stop(timeout_s)  # inside the bounded task, so even a synchronous raise is only logged


def grpc_bindings(patterns: Sequence[Pattern]) -> list[ServiceBinding]:
    """Every service of the API: the patterns' servicers, and placeholders answering UNIMPLEMENTED."""
    implemented: dict[str, object] = {}
    for pattern in patterns:
        if pattern.service in implemented:
            raise ValueError(f"two patterns implement {pattern.service}")
        implemented[pattern.service] = pattern.servicer
    return bindings(implemented)


def rest_routers(patterns: Sequence[Pattern]) -> list[Router]:
    return [p.router for p in patterns if p.router is not None]


def peer_handlers(patterns: Sequence[Pattern]) -> dict[str, PeerHandler]:
    """Every pattern's handlers of calls from sibling workers; a kind belongs to one pattern."""
    handlers: dict[str, PeerHandler] = {}
    for pattern in patterns:
        for kind, handler in pattern.peer_handlers.items():
            if kind in handlers:
                raise ValueError(f"two patterns handle the peer call {kind!r}")
            handlers[kind] = handler
    return handlers


# --- The patterns ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    """What the pattern builders share: settings, definitions and the adapters every pattern may use."""

    settings: Settings
    definitions: Definitions
    producer: AsyncProducer
    admin: KafkaAdmin
    redis: RedisClient
    database: Database
    idempotency: Idempotency
    read_lag: ReadLag  # back-pressure: read sides register, the event store checks
    peers: Peers | None = None  # the sibling workers under `kpg serve --workers N`


def event_store_pattern(context: Context) -> Pattern:
    """append-event: the event store, with the stream indexer that feeds its reads."""
    settings, definitions = context.settings, context.definitions
    index_topics = [definitions.category_topic(c) for c in definitions.categories]
    if definitions.allow_undeclared_categories:
        index_topics.append(r"^.*\.events$")
    indexer = StreamIndexer(
        settings.kafka,
        StreamIndex(context.database),
        topics=index_topics,
        dead_letters=DeadLetterWriter(context.producer),
    )
    events = EventStore(
        settings=settings.events,
        kafka=settings.kafka,
        definitions=definitions,
        admin=context.admin,
        leases=LeaseStore(context.redis),
        idempotency=context.idempotency,
        indexer=indexer,
        scanner=PartitionScanner(settings.kafka),
        read_lag=context.read_lag,
        peers=context.peers,
    )
    context.read_lag.register(indexer.read_side_progress)
    write_timeout_s = settings.events.subscriber_write_timeout_ms / 1000

    async def start() -> None:
        if index_topics:
            await indexer.start()

    async def stop(timeout_s: float) -> None:
        # Queued appends first, then the indexer with the time that is left.
        deadline = asyncio.get_running_loop().time() + timeout_s
        await bounded(events.close(timeout_s), timeout_s + 3.0, what="stopping the event store")
        left = max(0.5, deadline - asyncio.get_running_loop().time())
        await bounded(indexer.stop(left), left + 3.0, what="stopping the stream indexer")

    return Pattern(
        name="append-event",
        service="kpg.v1.EventStore",
        servicer=EventStoreServicer(events, write_timeout_s=write_timeout_s),
        router=event_store_router(events, write_timeout_s=write_timeout_s),
        topics=events.topics,
        start=start,
        stop=stop,
        peer_handlers={"append": events.append_forwarded},
    )


def read_models_pattern(context: Context) -> Pattern:
    """query-read-model: the projections and their queries."""
    read_models = ReadModels(
        settings=context.settings.read_models,
        kafka=context.settings.kafka,
        definitions=context.definitions,
        store=ReadModelStore(context.database),
        admin=context.admin,
        producer=context.producer,
    )
    context.read_lag.register(read_models.read_side_progress)

    async def stop(timeout_s: float) -> None:
        await bounded(read_models.stop(), timeout_s, what="stopping the read models")

    return Pattern(
        name="query-read-model",
        service="kpg.v1.ReadModels",
        servicer=ReadModelsServicer(read_models),
        router=read_models_router(read_models),
        topics=read_models.topics,
        start=read_models.start,
        stop=stop,
    )


def request_reply_pattern(context: Context) -> Pattern:
    """request-reply: it creates its reply topic in its start (the name comes from Redis)."""
    requests = RequestReply(
        settings=context.settings.request_reply,
        kafka=context.settings.kafka,
        definitions=context.definitions,
        admin=context.admin,
        store=CorrelationStore(context.redis),
        idempotency=context.idempotency,
        peers=context.peers,
    )

    async def stop(timeout_s: float) -> None:
        await bounded(requests.stop(timeout_s), timeout_s, what="stopping request-reply")

    return Pattern(
        name="request-reply",
        service="kpg.v1.RequestReply",
        servicer=RequestReplyServicer(requests),
        router=request_reply_router(requests),
        start=requests.start,
        stop=stop,
        peer_handlers={PEER_REPLY: requests.reply_from_sibling},
    )


def sagas_pattern(context: Context) -> Pattern:
    """start-saga: the orchestrator; its reply topic is named in its start (from the saga database's id)."""
    sagas = Sagas(
        settings=context.settings.sagas,
        kafka=context.settings.kafka,
        definitions=context.definitions,
        admin=context.admin,
        store=SagaStore(context.database),
        changes=ChangeFeed(context.redis, SAGA_CHANGES_CHANNEL),
        idempotency=context.idempotency,
    )
    write_timeout_s = context.settings.events.subscriber_write_timeout_ms / 1000
    return Pattern(
        name="start-saga",
        service="kpg.v1.Sagas",
        servicer=SagasServicer(sagas, write_timeout_s=write_timeout_s),
        router=sagas_router(sagas, write_timeout_s=write_timeout_s),
        topics=sagas.topics,
        start=sagas.start,
        stop=sagas.stop,
    )


def dead_letters_pattern(context: Context) -> Pattern:
    """DLT reprocessing: list, inspect, replay at most once and discard dead letters; its state topic."""
    kafka, settings = context.settings.kafka, context.settings.dead_letters
    dead_letters = DeadLetters(
        settings=settings,
        admin=context.admin,
        scanners=lambda: PartitionScanner(kafka),
        writers=lambda transactional_id: TransactionalProducer(
            kafka, transactional_id, transaction_timeout_ms=settings.transaction_timeout_ms
        ),
        replay_allowed=context.definitions.replay_allowed,
    )
    return Pattern(
        name="DLT reprocessing",
        service="kpg.v1.DeadLetters",
        servicer=DeadLettersServicer(dead_letters),
        router=dead_letters_router(dead_letters),
        topics=dead_letters.topics,
        stop=dead_letters.stop,
    )
