"""The RPCs of the typed client, each as a ready-to-send call: the request (its idempotency key fixed before
the first attempt), how to read the answer, and whether sending it twice is safe.

`AsyncClient` and `Client` only send these, so the two stay the same call for call.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from kpg import _convert as convert
from kpg.models import (
    AppendResult,
    DeadLetter,
    DeadLetterPage,
    DeadLetterState,
    DeadLetterTopic,
    Document,
    Event,
    ExpectedState,
    Filter,
    FilterOp,
    QueryResult,
    ReadModelStatus,
    RecordedEvent,
    Reply,
    ReprocessResult,
    Saga,
    SagaPage,
    SagaStatus,
    StreamSlice,
)
from kpg.v1 import dead_letters_pb2, event_store_pb2, read_models_pb2, request_reply_pb2, sagas_pb2

P = TypeVar("P", bound=Message)
R = TypeVar("R")

Filters = Mapping[str, Any] | Iterable[Filter | tuple[str, FilterOp | str, Any]]
Payload = Mapping[str, Any] | Sequence[Any] | str | bytes

_DEFAULT_WAIT_S = 5.0  # the gateway's wait for min_position when wait_timeout_ms is 0
_DEFAULT_REPLY_WAIT_S = 10.0  # its default request timeout


@dataclass(frozen=True, slots=True)
class Unary(Generic[P, R]):
    """A unary RPC to send. `server_wait` is how long the gateway may wait before answering (seconds);
    the call's deadline allows for it."""

    method: str
    request: Message
    response_type: type[P]
    convert: Callable[[P], R]
    safe_to_retry: bool = True
    server_wait: float = 0.0


def _never(_: object) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Streaming(Generic[P, R]):
    """A server-streaming RPC to follow. After a reconnect it continues with `resume(last item)` (the
    original request before any item); it ends after an item for which `is_last` holds."""

    method: str
    request: Message
    response_type: type[P]
    convert: Callable[[P], R]
    resume: Callable[[R], Message] | None = None
    is_last: Callable[[R], bool] = _never


def _rpc(service: str, method: str) -> str:
    return f"/kpg.v1.{service}/{method}"


def _key(idempotency_key: str | None) -> str:
    # Fixed once, before the first attempt: every retry carries it, so the gateway answers a retry of a
    # call that did go through with the first answer instead of doing it twice.
    return idempotency_key or str(uuid.uuid4())


def _wait(wait_timeout_ms: int, asked: bool) -> float:
    return (wait_timeout_ms / 1000 or _DEFAULT_WAIT_S) if asked else 0.0


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")


def _ids(ids: str | Iterable[str] | None) -> list[str]:
    return [ids] if isinstance(ids, str) else list(ids or ())


# --- event store ---------------------------------------------------------------------------------------


def append(
    category: str,
    stream_id: str,
    events: Event | Iterable[Event],
    *,
    expected_version: int | None,
    expected_state: ExpectedState | str | None,
    idempotency_key: str | None,
    correlation_id: str | None,
    causation_id: str | None,
) -> Unary[event_store_pb2.AppendEventsResponse, AppendResult]:
    """AppendEvents."""
    if expected_version is not None and expected_state is not None:
        raise ValueError("pass expected_version or expected_state, not both")
    request = event_store_pb2.AppendEventsRequest(
        category=category,
        stream_id=stream_id,
        events=[convert.event_to_pb(e) for e in ([events] if isinstance(events, Event) else events)],
        idempotency_key=_key(idempotency_key),
        correlation_id=correlation_id or "",
        causation_id=causation_id or "",
    )
    if expected_version is not None:
        request.expected_version = expected_version
    elif expected_state is not None:
        request.expected_state = event_store_pb2.ExpectedState.Value(
            f"EXPECTED_STATE_{ExpectedState(str(expected_state).upper())}"
        )
    return Unary(
        _rpc("EventStore", "AppendEvents"),
        request,
        event_store_pb2.AppendEventsResponse,
        convert.append_result_from_pb,
    )


def read_stream(
    category: str,
    stream_id: str,
    *,
    from_version: int,
    max_count: int,
    backwards: bool,
    min_position: str | None,
    wait_timeout_ms: int,
) -> Unary[event_store_pb2.ReadStreamResponse, StreamSlice]:
    """ReadStream."""
    request = event_store_pb2.ReadStreamRequest(
        category=category,
        stream_id=stream_id,
        from_version=from_version,
        max_count=max_count,
        backwards=backwards,
        min_position=min_position or "",
        wait_timeout_ms=wait_timeout_ms,
    )
    return Unary(
        _rpc("EventStore", "ReadStream"),
        request,
        event_store_pb2.ReadStreamResponse,
        convert.stream_slice_from_pb,
        server_wait=_wait(wait_timeout_ms, bool(min_position)),
    )


def subscribe(
    category: str, stream_id: str | None, *, from_version: int | None, from_position: str | None
) -> Streaming[event_store_pb2.EventEnvelope, RecordedEvent]:
    """Subscribe; a reconnect continues after the last event delivered."""
    if from_version is not None and from_position is not None:
        raise ValueError("pass from_version or from_position, not both")
    request = event_store_pb2.SubscribeRequest(category=category, stream_id=stream_id or "")
    if from_version is not None:
        request.from_version = from_version
    elif from_position is not None:
        request.from_position = from_position

    def after(event: RecordedEvent) -> Message:
        return event_store_pb2.SubscribeRequest(
            category=category, stream_id=stream_id or "", from_position=event.position
        )

    return Streaming(
        _rpc("EventStore", "Subscribe"),
        request,
        event_store_pb2.EventEnvelope,
        convert.recorded_event_from_pb,
        resume=after,
    )


# --- read models ---------------------------------------------------------------------------------------


def get(
    read_model: str, key: str, *, min_position: str | None, wait_timeout_ms: int
) -> Unary[read_models_pb2.Document, Document]:
    """ReadModels.Get."""
    request = read_models_pb2.GetDocumentRequest(
        read_model=read_model, key=key, min_position=min_position or "", wait_timeout_ms=wait_timeout_ms
    )
    return Unary(
        _rpc("ReadModels", "Get"),
        request,
        read_models_pb2.Document,
        convert.document_from_pb,
        server_wait=_wait(wait_timeout_ms, bool(min_position)),
    )


def query(
    read_model: str,
    filters: Filters | None,
    *,
    order_by: str | None,
    descending: bool,
    limit: int,
    page_token: str | None,
    min_position: str | None,
    wait_timeout_ms: int,
) -> Unary[read_models_pb2.QueryResponse, QueryResult]:
    """ReadModels.Query."""
    request = read_models_pb2.QueryRequest(
        read_model=read_model,
        filters=convert.filters_to_pb(filters),
        order_by=order_by or "",
        descending=descending,
        limit=limit,
        page_token=page_token or "",
        min_position=min_position or "",
        wait_timeout_ms=wait_timeout_ms,
    )
    return Unary(
        _rpc("ReadModels", "Query"),
        request,
        read_models_pb2.QueryResponse,
        convert.query_result_from_pb,
        server_wait=_wait(wait_timeout_ms, bool(min_position)),
    )


def read_model_status(read_model: str) -> Unary[read_models_pb2.ReadModelStatus, ReadModelStatus]:
    """ReadModels.GetStatus."""
    return Unary(
        _rpc("ReadModels", "GetStatus"),
        read_models_pb2.GetStatusRequest(read_model=read_model),
        read_models_pb2.ReadModelStatus,
        convert.read_model_status_from_pb,
    )


def list_read_models() -> Unary[read_models_pb2.ListReadModelsResponse, list[ReadModelStatus]]:
    """ReadModels.ListReadModels."""
    return Unary(
        _rpc("ReadModels", "ListReadModels"),
        read_models_pb2.ListReadModelsRequest(),
        read_models_pb2.ListReadModelsResponse,
        convert.read_model_statuses_from_pb,
    )


def rebuild_read_model(read_model: str) -> Unary[read_models_pb2.ReadModelStatus, ReadModelStatus]:
    """ReadModels.Rebuild: a write without an idempotency key, never retried."""
    return Unary(
        _rpc("ReadModels", "Rebuild"),
        read_models_pb2.RebuildRequest(read_model=read_model),
        read_models_pb2.ReadModelStatus,
        convert.read_model_status_from_pb,
        safe_to_retry=False,
    )


# --- sagas ---------------------------------------------------------------------------------------------


def start_saga(
    saga_type: str,
    input: Mapping[str, Any],
    *,
    saga_id: str | None,
    idempotency_key: str | None,
    correlation_id: str | None,
) -> Unary[sagas_pb2.Saga, Saga]:
    """Sagas.StartSaga."""
    request = sagas_pb2.StartSagaRequest(
        saga_type=saga_type,
        saga_id=saga_id or "",
        input=convert.struct_to_pb(input),
        idempotency_key=_key(idempotency_key),
        correlation_id=correlation_id or "",
    )
    return Unary(_rpc("Sagas", "StartSaga"), request, sagas_pb2.Saga, convert.saga_from_pb)


def get_saga(saga_id: str) -> Unary[sagas_pb2.Saga, Saga]:
    """Sagas.GetSaga."""
    return Unary(
        _rpc("Sagas", "GetSaga"),
        sagas_pb2.GetSagaRequest(saga_id=saga_id),
        sagas_pb2.Saga,
        convert.saga_from_pb,
    )


def list_sagas(
    *, saga_type: str | None, status: SagaStatus | str | None, limit: int, page_token: str | None
) -> Unary[sagas_pb2.ListSagasResponse, SagaPage]:
    """Sagas.ListSagas."""
    request = sagas_pb2.ListSagasRequest(
        saga_type=saga_type or "",
        status=convert.saga_status_to_pb(status),
        limit=limit,
        page_token=page_token or "",
    )
    return Unary(_rpc("Sagas", "ListSagas"), request, sagas_pb2.ListSagasResponse, convert.saga_page_from_pb)


def _is_final(saga: Saga) -> bool:
    return saga.status.is_final


def watch_saga(saga_id: str) -> Streaming[sagas_pb2.Saga, Saga]:
    """Sagas.WatchSaga; a reconnect starts again from the current state."""
    request = sagas_pb2.WatchSagaRequest(saga_id=saga_id)
    return Streaming(
        _rpc("Sagas", "WatchSaga"),
        request,
        sagas_pb2.Saga,
        convert.saga_from_pb,
        resume=lambda _: request,
        is_last=_is_final,
    )


# --- request-reply -------------------------------------------------------------------------------------


def _request_message(
    topic: str,
    payload: Payload,
    *,
    key: str | bytes | None,
    headers: Mapping[str, str] | None,
    timeout_ms: int,
    idempotency_key: str | None,
    correlation_id: str | None,
) -> request_reply_pb2.RequestMessage:
    return request_reply_pb2.RequestMessage(
        topic=topic,
        key=_bytes(key),
        payload=convert.json_bytes(payload),
        headers=dict(headers or {}),
        timeout_ms=timeout_ms,
        idempotency_key=_key(idempotency_key),
        correlation_id=correlation_id or "",
    )


def request(
    topic: str,
    payload: Payload,
    *,
    key: str | bytes | None,
    headers: Mapping[str, str] | None,
    timeout_ms: int,
    idempotency_key: str | None,
    correlation_id: str | None,
) -> Unary[request_reply_pb2.ReplyMessage, Reply]:
    """RequestReply.Request."""
    message = _request_message(
        topic,
        payload,
        key=key,
        headers=headers,
        timeout_ms=timeout_ms,
        idempotency_key=idempotency_key,
        correlation_id=correlation_id,
    )
    return Unary(
        _rpc("RequestReply", "Request"),
        message,
        request_reply_pb2.ReplyMessage,
        convert.reply_from_pb,
        server_wait=timeout_ms / 1000 or _DEFAULT_REPLY_WAIT_S,
    )


def submit_request(
    topic: str,
    payload: Payload,
    *,
    key: str | bytes | None,
    headers: Mapping[str, str] | None,
    timeout_ms: int,
    idempotency_key: str | None,
    correlation_id: str | None,
) -> Unary[request_reply_pb2.SubmitRequestResponse, str]:
    """RequestReply.SubmitRequest."""
    message = _request_message(
        topic,
        payload,
        key=key,
        headers=headers,
        timeout_ms=timeout_ms,
        idempotency_key=idempotency_key,
        correlation_id=correlation_id,
    )
    return Unary(
        _rpc("RequestReply", "SubmitRequest"),
        message,
        request_reply_pb2.SubmitRequestResponse,
        convert.correlation_id_from_pb,
    )


def get_reply(correlation_id: str, *, wait_timeout_ms: int) -> Unary[request_reply_pb2.ReplyMessage, Reply]:
    """RequestReply.GetReply."""
    return Unary(
        _rpc("RequestReply", "GetReply"),
        request_reply_pb2.GetReplyRequest(correlation_id=correlation_id, wait_timeout_ms=wait_timeout_ms),
        request_reply_pb2.ReplyMessage,
        convert.reply_from_pb,
        server_wait=wait_timeout_ms / 1000,
    )


# --- dead letters --------------------------------------------------------------------------------------


def list_dead_letter_topics() -> Unary[dead_letters_pb2.ListDeadLetterTopicsResponse, list[DeadLetterTopic]]:
    """DeadLetters.ListDeadLetterTopics."""
    return Unary(
        _rpc("DeadLetters", "ListDeadLetterTopics"),
        dead_letters_pb2.ListDeadLetterTopicsRequest(),
        dead_letters_pb2.ListDeadLetterTopicsResponse,
        convert.dead_letter_topics_from_pb,
    )


def list_dead_letters(
    dlt_topic: str,
    *,
    original_topic: str | None,
    error_class: str | None,
    key: str | bytes | None,
    since: datetime | None,
    until: datetime | None,
    state: DeadLetterState | str | None,
    limit: int,
    page_token: str | None,
) -> Unary[dead_letters_pb2.ListDeadLettersResponse, DeadLetterPage]:
    """DeadLetters.ListDeadLetters."""
    request = dead_letters_pb2.ListDeadLettersRequest(
        dlt_topic=dlt_topic,
        original_topic=original_topic or "",
        error_class=error_class or "",
        key=_bytes(key),
        state=convert.dead_letter_state_to_pb(state),
        limit=limit,
        page_token=page_token or "",
        **convert.since_until_to_pb(since, until),
    )
    return Unary(
        _rpc("DeadLetters", "ListDeadLetters"),
        request,
        dead_letters_pb2.ListDeadLettersResponse,
        convert.dead_letter_page_from_pb,
    )


def get_dead_letter(
    dlt_topic: str, partition: int, offset: int
) -> Unary[dead_letters_pb2.DeadLetter, DeadLetter]:
    """DeadLetters.GetDeadLetter."""
    return Unary(
        _rpc("DeadLetters", "GetDeadLetter"),
        dead_letters_pb2.GetDeadLetterRequest(dlt_topic=dlt_topic, partition=partition, offset=offset),
        dead_letters_pb2.DeadLetter,
        convert.dead_letter_from_pb,
    )


def reprocess_dead_letters(
    dlt_topic: str,
    *,
    ids: str | Iterable[str] | None,
    original_topic: str | None,
    error_class: str | None,
    key: str | bytes | None,
    since: datetime | None,
    until: datetime | None,
    state: DeadLetterState | str | None,
    target_topic: str | None,
    dry_run: bool,
    force: bool,
) -> Unary[dead_letters_pb2.ReprocessResponse, ReprocessResult]:
    """DeadLetters.Reprocess: a write without an idempotency key, retried only as a dry run."""
    request = dead_letters_pb2.ReprocessRequest(
        dlt_topic=dlt_topic,
        ids=_ids(ids),
        original_topic=original_topic or "",
        error_class=error_class or "",
        key=_bytes(key),
        state=convert.dead_letter_state_to_pb(state),
        target_topic=target_topic or "",
        dry_run=dry_run,
        force=force,
        **convert.since_until_to_pb(since, until),
    )
    return Unary(
        _rpc("DeadLetters", "Reprocess"),
        request,
        dead_letters_pb2.ReprocessResponse,
        convert.reprocess_result_from_pb,
        safe_to_retry=dry_run,
    )


def discard_dead_letters(
    dlt_topic: str, ids: str | Iterable[str], *, reason: str
) -> Unary[dead_letters_pb2.DiscardResponse, int]:
    """DeadLetters.Discard: a write without an idempotency key, never retried."""
    return Unary(
        _rpc("DeadLetters", "Discard"),
        dead_letters_pb2.DiscardRequest(dlt_topic=dlt_topic, ids=_ids(ids), reason=reason),
        dead_letters_pb2.DiscardResponse,
        convert.discarded_from_pb,
        safe_to_retry=False,
    )
