"""The typed Python client (`kpg.AsyncClient`, `kpg.Client`) against a real in-process grpc.aio server whose
tiny servicers fail on purpose: every contract reason becomes its exception class, and the retry policy
resends a write only with one idempotency key, backs off within the deadline and resumes streams."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import kpg
import pytest
from kpg._retry import Attempts, RetryPolicy
from kpg.v1 import (
    dead_letters_pb2,
    dead_letters_pb2_grpc,
    event_store_pb2,
    event_store_pb2_grpc,
    sagas_pb2,
    sagas_pb2_grpc,
)

from gateway.errors import (
    BackendUnavailable,
    GatewayError,
    InvalidArgument,
    RateLimited,
    Reason,
    WrongExpectedVersion,
)
from gateway.transport.grpc.interceptors import to_status

Context = grpc.aio.ServicerContext[Any, Any]
Failure = GatewayError | grpc.StatusCode


async def _fail(context: Context, failure: Failure) -> None:
    if isinstance(failure, grpc.StatusCode):  # a bare status, as a proxy or the transport gives
        await context.abort(failure, f"bare {failure.name}")
    status = to_status(failure)  # exactly what the gateway's interceptor sends
    await context.abort(status.code, status.details, status.trailing_metadata)


def _event(version: int) -> event_store_pb2.EventEnvelope:
    return event_store_pb2.EventEnvelope(
        category="orders",
        stream_id="o-1",
        version=version,
        type="OrderPlaced",
        data=b"{}",
        position=f"p-{version}",
    )


class FlakyEventStore(event_store_pb2_grpc.EventStoreServicer):
    """Fails the first `failures` calls of each RPC with `failure`, then answers; records what it saw."""

    def __init__(self, failures: int = 0, failure: Failure = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures = failures
        self.failure = failure
        self.keys: list[str] = []
        self.reads = 0
        self.subscriptions: list[event_store_pb2.SubscribeRequest] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self.delay = 0.0

    async def AppendEvents(
        self, request: event_store_pb2.AppendEventsRequest, context: Context
    ) -> event_store_pb2.AppendEventsResponse:
        self.keys.append(request.idempotency_key)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if len(self.keys) <= self.failures:
            await _fail(context, self.failure)
        return event_store_pb2.AppendEventsResponse(
            first_version=1, last_version=len(request.events), position="p-1", duplicate=len(self.keys) > 1
        )

    async def ReadStream(
        self, request: event_store_pb2.ReadStreamRequest, context: Context
    ) -> event_store_pb2.ReadStreamResponse:
        self.reads += 1
        await asyncio.sleep(self.delay)
        if self.reads <= self.failures:
            await _fail(context, self.failure)
        return event_store_pb2.ReadStreamResponse(events=[_event(1)], stream_version=1)

    async def Subscribe(
        self, request: event_store_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[event_store_pb2.EventEnvelope]:
        self.subscriptions.append(request)
        if len(self.subscriptions) == 1:  # two events, then the connection "drops"
            yield _event(1)
            yield _event(2)
            await _fail(context, grpc.StatusCode.UNAVAILABLE)
        yield _event(3)


class FlakyDeadLetters(dead_letters_pb2_grpc.DeadLettersServicer):
    """Every call fails UNAVAILABLE: counts how often each write was sent."""

    def __init__(self) -> None:
        self.reprocessed = 0
        self.discarded = 0

    async def Reprocess(
        self, request: dead_letters_pb2.ReprocessRequest, context: Context
    ) -> dead_letters_pb2.ReprocessResponse:
        self.reprocessed += 1
        await _fail(context, grpc.StatusCode.UNAVAILABLE)
        raise AssertionError("abort returned")

    async def Discard(
        self, request: dead_letters_pb2.DiscardRequest, context: Context
    ) -> dead_letters_pb2.DiscardResponse:
        self.discarded += 1
        await _fail(context, grpc.StatusCode.UNAVAILABLE)
        raise AssertionError("abort returned")

    async def ListDeadLetterTopics(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def ListDeadLetters(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def GetDeadLetter(self, request: Any, context: Context) -> Any:
        raise NotImplementedError


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """Starts a grpc.aio server with the given servicers on a free port; returns its target."""
    servers: list[grpc.aio.Server] = []

    async def start(
        events: FlakyEventStore | None = None,
        dead_letters: FlakyDeadLetters | None = None,
        sagas: FakeSagas | None = None,
    ) -> str:
        server = grpc.aio.server()
        if sagas is not None:
            sagas_pb2_grpc.add_SagasServicer_to_server(sagas, server)
        if events is not None:
            event_store_pb2_grpc.add_EventStoreServicer_to_server(events, server)
        if dead_letters is not None:
            dead_letters_pb2_grpc.add_DeadLettersServicer_to_server(dead_letters, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(None)


class FakeSagas(sagas_pb2_grpc.SagasServicer):
    """Starts sagas as RUNNING; a watch streams RUNNING, then COMPLETED, then keeps the stream open."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def StartSaga(self, request: sagas_pb2.StartSagaRequest, context: Context) -> sagas_pb2.Saga:
        self.keys.append(request.idempotency_key)
        return sagas_pb2.Saga(
            saga_id=request.saga_id,
            saga_type=request.saga_type,
            status=sagas_pb2.SAGA_STATUS_RUNNING,
            context=request.input,
        )

    async def WatchSaga(
        self, request: sagas_pb2.WatchSagaRequest, context: Context
    ) -> AsyncIterator[sagas_pb2.Saga]:
        for status in (sagas_pb2.SAGA_STATUS_RUNNING, sagas_pb2.SAGA_STATUS_COMPLETED):
            yield sagas_pb2.Saga(saga_id=request.saga_id, status=status)
        await asyncio.sleep(30)  # a final status ends the client's iteration, whatever the server does

    async def GetSaga(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def ListSagas(self, request: Any, context: Context) -> Any:
        raise NotImplementedError


def fast_async(target: str, **options: Any) -> kpg.AsyncClient:
    """An asyncio client with short pauses between attempts."""
    return kpg.AsyncClient(target, initial_backoff=0.01, max_backoff=0.05, **options)


def fast_sync(target: str, **options: Any) -> kpg.Client:
    """A blocking client with short pauses between attempts."""
    return kpg.Client(target, initial_backoff=0.01, max_backoff=0.05, **options)


ORDER = kpg.Event("OrderPlaced", {"customer": "c-1", "total": 42})


# --- error mapping -------------------------------------------------------------------------------------

BY_REASON: dict[Reason, type[kpg.KpgError]] = {
    Reason.INVALID_ARGUMENT: kpg.InvalidArgument,
    Reason.PAYLOAD_TOO_LARGE: kpg.PayloadTooLarge,
    Reason.WRONG_EXPECTED_VERSION: kpg.WrongExpectedVersion,
    Reason.IDEMPOTENCY_KEY_REUSED: kpg.IdempotencyKeyReused,
    Reason.IDEMPOTENCY_KEY_IN_FLIGHT: kpg.IdempotencyKeyInFlight,
    Reason.NOT_FOUND: kpg.NotFound,
    Reason.TOPIC_NOT_ALLOWED: kpg.TopicNotAllowed,
    Reason.UNAUTHENTICATED: kpg.Unauthenticated,
    Reason.REPLY_TIMEOUT: kpg.ReplyTimeout,
    Reason.READ_MODEL_BEHIND: kpg.ReadModelBehind,
    Reason.BACKEND_UNAVAILABLE: kpg.BackendUnavailable,
    Reason.UNIMPLEMENTED: kpg.KpgError,  # not a contract reason: the root class
    Reason.SUBSCRIBER_TOO_SLOW: kpg.SubscriberTooSlow,
    Reason.RATE_LIMITED: kpg.RateLimited,
}


def test_every_gateway_reason_has_its_class() -> None:
    assert set(BY_REASON) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.name)
async def test_an_error_info_reason_becomes_its_exception(serve: Callable[..., Any], reason: Reason) -> None:
    store = FlakyEventStore(failures=1, failure=GatewayError("it failed", reason=reason, metadata={"k": "v"}))
    async with kpg.AsyncClient(await serve(store), retries=0) as client:
        with pytest.raises(kpg.KpgError) as raised:
            await client.read_stream("orders", "o-1")

    error = raised.value
    assert type(error) is BY_REASON[reason]
    assert (error.code, error.reason, error.message) == (
        grpc.StatusCode[reason.grpc_code],
        reason.name,
        "it failed",
    )
    assert error.metadata == {"k": "v"}
    assert str(error) == f"{reason.name}: it failed"
    assert isinstance(error.__cause__, grpc.RpcError)


async def test_reason_metadata_is_typed(serve: Callable[..., Any]) -> None:
    failures: list[GatewayError] = [
        WrongExpectedVersion("stream is at 3", metadata={"expected": "0", "actual": "3"}),
        RateLimited("too many", retry_after_ms=250),
        GatewayError("slow", reason=Reason.SUBSCRIBER_TOO_SLOW, metadata={"position": "p-9"}),
        InvalidArgument.field("events[0].type", "must be 1-200 printable characters"),
    ]
    raised: list[kpg.KpgError] = []
    for failure in failures:
        async with kpg.AsyncClient(await serve(FlakyEventStore(1, failure)), retries=0) as client:
            try:
                await client.read_stream("orders", "o-1")
            except kpg.KpgError as exc:
                raised.append(exc)

    wrong, limited, slow, invalid = raised
    assert isinstance(wrong, kpg.WrongExpectedVersion)
    assert (wrong.actual, wrong.expected) == (3, "0")
    assert isinstance(limited, kpg.RateLimited)
    assert limited.retry_after_ms == 250
    assert isinstance(slow, kpg.SubscriberTooSlow)
    assert slow.position == "p-9"
    assert isinstance(invalid, kpg.InvalidArgument)
    assert invalid.field_violations == {"events[0].type": "must be 1-200 printable characters"}


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, kpg.Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, kpg.Unauthenticated),
        (grpc.StatusCode.INTERNAL, kpg.KpgError),
    ],
)
async def test_a_status_without_error_info_is_classified_by_its_code(
    serve: Callable[..., Any], code: grpc.StatusCode, expected: type[kpg.KpgError]
) -> None:
    async with kpg.AsyncClient(await serve(FlakyEventStore(1, code)), retries=0) as client:
        with pytest.raises(kpg.KpgError) as raised:
            await client.read_stream("orders", "o-1")
    assert type(raised.value) is expected
    assert (raised.value.code, raised.value.reason) == (code, "")


async def test_an_unreachable_gateway_is_unavailable_and_a_slow_one_misses_the_deadline(
    serve: Callable[..., Any],
) -> None:
    async with kpg.AsyncClient("127.0.0.1:1", retries=0) as client:
        with pytest.raises(kpg.Unavailable):
            await client.get_saga("s-1")

    store = FlakyEventStore()
    store.delay = 1.0
    async with kpg.AsyncClient(await serve(store)) as client:
        started = time.monotonic()
        with pytest.raises(kpg.DeadlineExceeded) as raised:
            await client.read_stream("orders", "o-1", timeout=0.2)
    assert time.monotonic() - started < 0.9
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_sync_client_raises_the_same_classes(serve: Callable[..., Any]) -> None:
    failure = WrongExpectedVersion("stream is at 1", metadata={"expected": "0", "actual": "1"})
    target = await serve(FlakyEventStore(1, failure))

    def append() -> None:
        with kpg.Client(target) as client:
            client.append("orders", "o-1", ORDER, expected_version=0)

    with pytest.raises(kpg.WrongExpectedVersion) as raised:
        await asyncio.to_thread(append)
    assert raised.value.actual == 1


# --- retries -------------------------------------------------------------------------------------------


async def test_a_write_is_retried_with_one_generated_idempotency_key(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=2, failure=BackendUnavailable("kafka is down"))
    async with fast_async(await serve(store), retries=3) as client:
        first = await client.append("orders", "o-1", [ORDER], expected_version=0)
        await client.append("orders", "o-1", [ORDER])

    assert first.first_version == 1
    assert len(store.keys) == 4
    assert len(set(store.keys[:3])) == 1  # three attempts, one key
    assert uuid.UUID(store.keys[0]).version == 4
    assert store.keys[3] != store.keys[0]  # the next append is another request


async def test_a_given_idempotency_key_is_sent_on_every_attempt(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=1)
    async with fast_async(await serve(store)) as client:
        await client.append("orders", "o-1", ORDER, idempotency_key="order-42")
    assert store.keys == ["order-42", "order-42"]


async def test_retries_stop_after_the_configured_number(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=10)
    async with fast_async(await serve(store), retries=2) as client:
        with pytest.raises(kpg.Unavailable):
            await client.append("orders", "o-1", ORDER)
    assert len(store.keys) == 3


async def test_backoff_stays_within_the_deadline(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=1000)
    target = await serve(store)
    async with kpg.AsyncClient(target, retries=1000, initial_backoff=0.05, max_backoff=1.0) as client:
        started = time.monotonic()
        # The last UNAVAILABLE when the next pause would end too late, or the deadline during a last attempt.
        with pytest.raises((kpg.Unavailable, kpg.DeadlineExceeded)):
            await client.read_stream("orders", "o-1", timeout=0.5)
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.1  # scheduling slack only: no pause runs past the deadline
    assert 3 <= store.reads <= 6  # pauses of 0.05 s doubling: attempts at 0, ~0.04, ~0.11, ~0.26, (~0.5)


def test_pauses_double_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=10, initial_backoff=0.1, max_backoff=0.4)
    down = kpg.Unavailable(grpc.StatusCode.UNAVAILABLE, "", "down")
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.4), (9, 0.4)]:
        pauses = [policy.pause(failures, down) for _ in range(50)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses)
        assert len(set(pauses)) > 1
    limited = kpg.RateLimited(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "", {"retry_after_ms": "900"}
    )
    assert policy.pause(1, limited) == 0.9


def test_no_pause_ends_past_the_deadline_and_only_safe_calls_pause() -> None:
    down = kpg.Unavailable(grpc.StatusCode.UNAVAILABLE, "", "down")
    policy = RetryPolicy(retries=100, initial_backoff=1.0, max_backoff=1.0)
    assert Attempts(policy, 0.4, safe_to_retry=True).pause_after(down) is None  # any pause is >= 0.5 s
    assert Attempts(policy, None, safe_to_retry=False).pause_after(down) is None
    attempts = Attempts(RetryPolicy(retries=2), None, safe_to_retry=True)
    assert [attempts.pause_after(down) is not None for _ in range(3)] == [True, True, False]
    not_found = kpg.NotFound(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "no such saga")
    assert Attempts(policy, None, safe_to_retry=True).pause_after(not_found) is None


async def test_rate_limited_waits_at_least_retry_after(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=1, failure=RateLimited("queue full", retry_after_ms=200))
    async with fast_async(await serve(store)) as client:
        started = time.monotonic()
        slice_ = await client.read_stream("orders", "o-1")
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2.0
    assert (store.reads, slice_.stream_version) == (2, 1)


async def test_other_errors_are_not_retried(serve: Callable[..., Any]) -> None:
    failure = WrongExpectedVersion("stream is at 1", metadata={"expected": "0", "actual": "1"})
    store = FlakyEventStore(failures=1, failure=failure)
    async with fast_async(await serve(store)) as client:
        with pytest.raises(kpg.WrongExpectedVersion):
            await client.append("orders", "o-1", ORDER, expected_version=0)
    assert len(store.keys) == 1


async def test_a_write_without_an_idempotency_key_is_never_retried(serve: Callable[..., Any]) -> None:
    letters = FlakyDeadLetters()
    async with fast_async(await serve(dead_letters=letters), retries=3) as client:
        with pytest.raises(kpg.Unavailable):
            await client.discard_dead_letters("orders.events.DLT", ["orders.events.DLT:0:1"], reason="test")
        with pytest.raises(kpg.Unavailable):
            await client.reprocess_dead_letters("orders.events.DLT")
        assert (letters.discarded, letters.reprocessed) == (1, 1)
        with pytest.raises(kpg.Unavailable):  # a dry run writes nothing: retried like a read
            await client.reprocess_dead_letters("orders.events.DLT", dry_run=True)
    assert letters.reprocessed == 1 + 4


async def test_the_sync_client_retries_with_one_key(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=2)
    target = await serve(store)

    def append() -> kpg.AppendResult:
        with fast_sync(target) as client:
            return client.append("orders", "o-1", ORDER)

    result = await asyncio.to_thread(append)
    assert (result.first_version, result.position, result.duplicate) == (1, "p-1", True)
    assert len(store.keys) == 3
    assert len(set(store.keys)) == 1


# --- streams and call options --------------------------------------------------------------------------


async def test_a_subscription_resumes_after_the_last_event_it_delivered(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore()
    async with fast_async(await serve(store)) as client:
        versions = []
        async with client.subscribe("orders", "o-1", from_version=1) as events:
            async for event in events:
                versions.append(event.version)
                if event.version == 3:
                    break

    assert versions == [1, 2, 3]
    first, resumed = store.subscriptions
    assert (first.WhichOneof("start"), first.from_version) == ("from_version", 1)
    assert (resumed.WhichOneof("start"), resumed.from_position) == ("from_position", "p-2")


async def test_the_sync_subscription_resumes_too(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore()
    target = await serve(store)

    def subscribe() -> list[int]:
        with fast_sync(target) as client, client.subscribe("orders", "o-1") as events:
            return [event.version for event in itertools.islice(events, 3)]

    assert await asyncio.to_thread(subscribe) == [1, 2, 3]
    assert store.subscriptions[1].from_position == "p-2"


async def test_token_and_metadata_go_with_every_call(serve: Callable[..., Any]) -> None:
    store = FlakyEventStore(failures=1)
    async with fast_async(await serve(store), token="s3cret", metadata={"X-Tenant": "t-1"}) as client:
        await client.append("orders", "o-1", ORDER)
    for seen in store.metadata:
        assert (seen["authorization"], seen["x-tenant"]) == ("Bearer s3cret", "t-1")


async def test_a_saga_starts_with_a_generated_key_and_its_watch_ends_at_a_final_status(
    serve: Callable[..., Any],
) -> None:
    sagas = FakeSagas()
    async with fast_async(await serve(sagas=sagas)) as client:
        saga = await client.start_saga(
            "place_order", {"sku": "A-1", "quantity": 2, "amount": 40.5}, saga_id="s-1"
        )
        statuses = [snapshot.status async for snapshot in client.watch_saga("s-1", timeout=5)]

    assert (saga.saga_id, saga.status, saga.status.is_final) == ("s-1", kpg.SagaStatus.RUNNING, False)
    assert saga.context == {"sku": "A-1", "quantity": 2, "amount": 40.5}
    assert type(saga.context["quantity"]) is int
    assert uuid.UUID(sagas.keys[0]).version == 4
    assert statuses == [kpg.SagaStatus.RUNNING, kpg.SagaStatus.COMPLETED]
