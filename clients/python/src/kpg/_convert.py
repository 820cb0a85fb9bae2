"""Protobuf <-> the typed client's values, in `*_to_pb` / `*_from_pb` pairs; nothing else touches both."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from kpg.models import (
    AppendResult,
    DeadLetter,
    DeadLetterFormat,
    DeadLetterPage,
    DeadLetterState,
    DeadLetterTopic,
    Document,
    Event,
    Filter,
    FilterOp,
    QueryResult,
    ReadModelState,
    ReadModelStatus,
    RebuildProgress,
    RecordedEvent,
    Reply,
    ReplyStatus,
    ReprocessResult,
    Saga,
    SagaPage,
    SagaStatus,
    SagaStep,
    StepStatus,
    StreamSlice,
)
from kpg.v1 import dead_letters_pb2, event_store_pb2, read_models_pb2, request_reply_pb2, sagas_pb2

JSON_CONTENT_TYPE = "application/json"
_E = TypeVar("_E", bound=enum.StrEnum)
_MAX_EXACT_FLOAT_INT = 2**53


def _enum_from_pb(cls: type[_E], name_of: Callable[[Any], str], prefix: str, value: int) -> _E:
    """The member named like the proto value without its prefix; UNSPECIFIED for a value this client
    does not know (a newer gateway)."""
    try:
        short = name_of(value).removeprefix(prefix)
    except ValueError:
        short = "UNSPECIFIED"
    return cls(short) if short in cls.__members__ else cls("UNSPECIFIED")


def _time_from_pb(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def _optional_time_from_pb(message: Any, field: str) -> datetime | None:
    return _time_from_pb(getattr(message, field)) if message.HasField(field) else None


def _time_to_pb(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def json_bytes(value: Mapping[str, Any] | Sequence[Any] | str | bytes) -> bytes:
    """A payload as bytes: bytes as they are, a str as UTF-8, anything else as JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


def _whole_numbers(value: Any) -> Any:
    # Struct carries every number as a double; JSON documents mostly mean integers.
    if isinstance(value, float) and value.is_integer() and math.fabs(value) <= _MAX_EXACT_FLOAT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def struct_from_pb(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, whole numbers as int."""
    converted: dict[str, Any] = _whole_numbers(json_format.MessageToDict(struct))
    return converted


def struct_to_pb(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a Struct."""
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _value_to_pb(value: Any) -> struct_pb2.Value:
    pb = struct_pb2.Value()
    json_format.ParseDict(value, pb)
    return pb


# --- event store ---------------------------------------------------------------------------------------


def event_to_pb(event: Event) -> event_store_pb2.EventData:
    """An `Event` as `EventData`: a mapping becomes JSON with content type application/json."""
    if isinstance(event.data, bytes):
        data, content_type = event.data, event.content_type or ""
    else:
        data, content_type = json_bytes(event.data), event.content_type or JSON_CONTENT_TYPE
    return event_store_pb2.EventData(
        event_id=event.event_id or "",
        type=event.type,
        data=data,
        content_type=content_type,
        metadata=dict(event.metadata),
    )


def append_result_from_pb(response: event_store_pb2.AppendEventsResponse) -> AppendResult:
    """An `AppendEventsResponse` as an `AppendResult`."""
    return AppendResult(
        first_version=response.first_version,
        last_version=response.last_version,
        position=response.position,
        topic=response.topic,
        partition=response.partition,
        first_offset=response.first_offset,
        last_offset=response.last_offset,
        duplicate=response.duplicate,
    )


def recorded_event_from_pb(envelope: event_store_pb2.EventEnvelope) -> RecordedEvent:
    """An `EventEnvelope` as a `RecordedEvent`."""
    return RecordedEvent(
        event_id=envelope.event_id,
        category=envelope.category,
        stream_id=envelope.stream_id,
        version=envelope.version,
        type=envelope.type,
        data=envelope.data,
        content_type=envelope.content_type,
        metadata=dict(envelope.metadata),
        recorded_at=_time_from_pb(envelope.recorded_at),
        topic=envelope.topic,
        partition=envelope.partition,
        offset=envelope.offset,
        position=envelope.position,
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
    )


def stream_slice_from_pb(response: event_store_pb2.ReadStreamResponse) -> StreamSlice:
    """A `ReadStreamResponse` as a `StreamSlice`."""
    return StreamSlice(
        events=tuple(recorded_event_from_pb(e) for e in response.events),
        stream_version=response.stream_version,
    )


# --- read models ---------------------------------------------------------------------------------------

_OPERATORS = {"==": "EQ", "=": "EQ", "!=": "NE", "<": "LT", "<=": "LTE", ">": "GT", ">=": "GTE"}


def filter_op(op: FilterOp | str) -> FilterOp:
    """A filter operator from its name (any case) or its symbol ("==", "!=", "<", "<=", ">", ">=")."""
    if isinstance(op, FilterOp):
        return op
    name = _OPERATORS.get(op, op.upper())
    if name not in FilterOp.__members__:
        raise ValueError(
            f"unknown filter operator {op!r}: use one of {', '.join(FilterOp)} or ==, !=, <, >, ..."
        )
    return FilterOp(name)


def filters_to_pb(
    filters: Mapping[str, Any] | Iterable[Filter | tuple[str, FilterOp | str, Any]] | None,
) -> list[read_models_pb2.Filter]:
    """Query filters as `Filter` messages: a mapping means field == value for each entry; else `Filter`s
    or (field, op, value) tuples."""
    if filters is None:
        return []
    if isinstance(filters, Mapping):
        conditions = [Filter(field, FilterOp.EQ, value) for field, value in filters.items()]
    else:
        conditions = [f if isinstance(f, Filter) else Filter(*f) for f in filters]
    return [
        read_models_pb2.Filter(
            field=f.field,
            op=read_models_pb2.FilterOp.Value(f"FILTER_OP_{filter_op(f.op)}"),
            value=_value_to_pb(f.value),
        )
        for f in conditions
    ]


def document_from_pb(document: read_models_pb2.Document) -> Document:
    """A `Document` message as a `Document`."""
    return Document(
        key=document.key,
        data=struct_from_pb(document.data),
        version=document.version,
        position=document.position,
        updated_at=_time_from_pb(document.updated_at),
        read_model=document.read_model,
    )


def query_result_from_pb(response: read_models_pb2.QueryResponse) -> QueryResult:
    """A `QueryResponse` as a `QueryResult`."""
    return QueryResult(
        documents=tuple(document_from_pb(d) for d in response.documents),
        next_page_token=response.next_page_token,
        position=response.position,
    )


def read_model_status_from_pb(status: read_models_pb2.ReadModelStatus) -> ReadModelStatus:
    """A `ReadModelStatus` message as a `ReadModelStatus`."""
    rebuild = status.rebuild if status.HasField("rebuild") else None
    return ReadModelStatus(
        read_model=status.read_model,
        state=_enum_from_pb(
            ReadModelState, read_models_pb2.ReadModelState.Name, "READ_MODEL_STATE_", status.state
        ),
        position=status.position,
        lag=status.lag,
        documents=status.documents,
        category=status.category,
        error=status.error,
        rebuild=None
        if rebuild is None
        else RebuildProgress(rebuild.position, rebuild.lag, rebuild.documents),
    )


def read_model_statuses_from_pb(response: read_models_pb2.ListReadModelsResponse) -> list[ReadModelStatus]:
    """A `ListReadModelsResponse` as a list of statuses."""
    return [read_model_status_from_pb(s) for s in response.read_models]


# --- sagas ---------------------------------------------------------------------------------------------


def saga_status_to_pb(status: SagaStatus | str | None) -> sagas_pb2.SagaStatus.ValueType:
    """A saga status (None: any) as its proto value."""
    return sagas_pb2.SagaStatus.Value(f"SAGA_STATUS_{SagaStatus(str(status or 'UNSPECIFIED').upper())}")


def saga_from_pb(saga: sagas_pb2.Saga) -> Saga:
    """A `Saga` message as a `Saga`."""
    return Saga(
        saga_id=saga.saga_id,
        saga_type=saga.saga_type,
        status=_enum_from_pb(SagaStatus, sagas_pb2.SagaStatus.Name, "SAGA_STATUS_", saga.status),
        steps=tuple(
            SagaStep(
                name=step.name,
                status=_enum_from_pb(StepStatus, sagas_pb2.StepStatus.Name, "STEP_STATUS_", step.status),
                attempts=step.attempts,
                error=step.error,
                compensation_attempts=step.compensation_attempts,
            )
            for step in saga.steps
        ),
        context=struct_from_pb(saga.context),
        failure_reason=saga.failure_reason,
        started_at=_time_from_pb(saga.started_at),
        updated_at=_time_from_pb(saga.updated_at),
        correlation_id=saga.correlation_id,
    )


def saga_page_from_pb(response: sagas_pb2.ListSagasResponse) -> SagaPage:
    """A `ListSagasResponse` as a `SagaPage`."""
    return SagaPage(
        sagas=tuple(saga_from_pb(s) for s in response.sagas), next_page_token=response.next_page_token
    )


# --- request-reply -------------------------------------------------------------------------------------


def reply_from_pb(reply: request_reply_pb2.ReplyMessage) -> Reply:
    """A `ReplyMessage` as a `Reply`."""
    return Reply(
        correlation_id=reply.correlation_id,
        status=_enum_from_pb(ReplyStatus, request_reply_pb2.ReplyStatus.Name, "REPLY_STATUS_", reply.status),
        payload=reply.payload,
        headers=dict(reply.headers),
        reply_topic=reply.reply_topic,
        partition=reply.partition,
        offset=reply.offset,
    )


def correlation_id_from_pb(response: request_reply_pb2.SubmitRequestResponse) -> str:
    """The correlation id a `SubmitRequest` answered."""
    return response.correlation_id


# --- dead letters --------------------------------------------------------------------------------------


def dead_letter_state_to_pb(
    state: DeadLetterState | str | None,
) -> dead_letters_pb2.DeadLetterState.ValueType:
    """A dead-letter state (None: any) as its proto value."""
    return dead_letters_pb2.DeadLetterState.Value(
        f"DEAD_LETTER_STATE_{DeadLetterState(str(state or 'UNSPECIFIED').upper())}"
    )


def since_until_to_pb(since: datetime | None, until: datetime | None) -> dict[str, timestamp_pb2.Timestamp]:
    """The `since` / `until` fields that are set, as Timestamps."""
    stamps = {"since": _time_to_pb(since), "until": _time_to_pb(until)}
    return {name: stamp for name, stamp in stamps.items() if stamp is not None}


def dead_letter_topics_from_pb(
    response: dead_letters_pb2.ListDeadLetterTopicsResponse,
) -> list[DeadLetterTopic]:
    """A `ListDeadLetterTopicsResponse` as a list of topics."""
    return [DeadLetterTopic(t.topic, t.partitions, t.record_count) for t in response.topics]


def dead_letter_from_pb(letter: dead_letters_pb2.DeadLetter) -> DeadLetter:
    """A `DeadLetter` message as a `DeadLetter`."""
    return DeadLetter(
        id=letter.id,
        dlt_topic=letter.dlt_topic,
        partition=letter.partition,
        offset=letter.offset,
        key=letter.key,
        payload=letter.payload,
        headers=dict(letter.headers),
        original_topic=letter.original_topic,
        original_partition=letter.original_partition,
        original_offset=letter.original_offset,
        original_timestamp=_optional_time_from_pb(letter, "original_timestamp"),
        consumer_group=letter.consumer_group,
        error_class=letter.error_class,
        error_message=letter.error_message,
        stack_trace=letter.stack_trace,
        attempts=letter.attempts,
        failed_at=_optional_time_from_pb(letter, "failed_at"),
        state=_enum_from_pb(
            DeadLetterState, dead_letters_pb2.DeadLetterState.Name, "DEAD_LETTER_STATE_", letter.state
        ),
        reprocess_count=letter.reprocess_count,
        format=_enum_from_pb(
            DeadLetterFormat, dead_letters_pb2.DeadLetterFormat.Name, "DEAD_LETTER_FORMAT_", letter.format
        ),
    )


def dead_letter_page_from_pb(response: dead_letters_pb2.ListDeadLettersResponse) -> DeadLetterPage:
    """A `ListDeadLettersResponse` as a `DeadLetterPage`."""
    return DeadLetterPage(
        dead_letters=tuple(dead_letter_from_pb(d) for d in response.dead_letters),
        next_page_token=response.next_page_token,
    )


def reprocess_result_from_pb(response: dead_letters_pb2.ReprocessResponse) -> ReprocessResult:
    """A `ReprocessResponse` as a `ReprocessResult`."""
    return ReprocessResult(response.selected, response.reprocessed, response.skipped, response.failed)


def discarded_from_pb(response: dead_letters_pb2.DiscardResponse) -> int:
    """How many records a `Discard` newly marked."""
    return response.discarded
