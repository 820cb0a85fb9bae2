"""Protobuf <-> domain conversions, as `*_from_pb` / `*_to_pb` pairs, shared by gRPC and REST.

REST bodies are parsed into the same protobuf messages (proto3 JSON mapping), so both transports
convert in exactly one place. Event `data` with a JSON content type travels over REST as a JSON value.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from kpg.v1 import dead_letters_pb2, event_store_pb2, read_models_pb2, request_reply_pb2, sagas_pb2

from gateway.domain.dead_letters import DeadLetter, DeadLetterFilter, DeadLetterState, DltFormat
from gateway.domain.events import (
    DEFAULT_CONTENT_TYPE,
    MAX_INT64,
    AppendRequest,
    AppendResult,
    Expectation,
    Expected,
    NewEvent,
    Position,
    ReadStreamQuery,
    StoredEvent,
    SubscribeQuery,
    check_range,
    is_json,
    new_event_id,
)
from gateway.domain.request_reply import Reply, ReplyStatus, Request
from gateway.domain.sagas import Saga, StartRequest
from gateway.errors import FieldViolation, InvalidArgument
from gateway.services.dead_letters import DeadLetterPage, DeadLetterTopic, ReprocessRequest, ReprocessResult
from gateway.services.read_models import Document, FieldFilter, ReadModelStatus

_EXPECTED_STATE = {
    event_store_pb2.EXPECTED_STATE_UNSPECIFIED: Expectation.ANY,
    event_store_pb2.EXPECTED_STATE_ANY: Expectation.ANY,
    event_store_pb2.EXPECTED_STATE_NO_STREAM: Expectation.NO_STREAM,
    event_store_pb2.EXPECTED_STATE_STREAM_EXISTS: Expectation.STREAM_EXISTS,
}


def append_from_pb(message: event_store_pb2.AppendEventsRequest) -> AppendRequest:
    match message.WhichOneof("expectation"):
        case "expected_version":
            expected = Expected(
                Expectation.EXACT, check_range("expected_version", message.expected_version, MAX_INT64)
            )
        case "expected_state":
            if message.expected_state not in _EXPECTED_STATE:
                raise InvalidArgument.field("expected_state", f"unknown value {message.expected_state}")
            expected = Expected(_EXPECTED_STATE[message.expected_state])
        case _:
            expected = Expected()
    return AppendRequest(
        category=message.category,
        stream_id=message.stream_id,
        events=tuple(
            NewEvent(
                event_id=e.event_id or new_event_id(),
                type=e.type,
                data=e.data,
                content_type=e.content_type or DEFAULT_CONTENT_TYPE,
                metadata=dict(e.metadata),
                client_id=bool(e.event_id),
            )
            for e in message.events
        ),
        expected=expected,
        idempotency_key=message.idempotency_key,
        correlation_id=message.correlation_id,
        causation_id=message.causation_id,
    )


def append_result_to_pb(result: AppendResult) -> event_store_pb2.AppendEventsResponse:
    return event_store_pb2.AppendEventsResponse(
        first_version=result.first_version,
        last_version=result.last_version,
        topic=result.topic,
        partition=result.partition,
        first_offset=result.first_offset,
        last_offset=result.last_offset,
        position=result.position,
        duplicate=result.duplicate,
    )


def event_to_pb(event: StoredEvent, *, position: str = "") -> event_store_pb2.EventEnvelope:
    envelope = event_store_pb2.EventEnvelope(
        event_id=event.event_id,
        category=event.category,
        stream_id=event.stream_id,
        version=event.version,
        type=event.type,
        data=event.data,
        content_type=event.content_type,
        metadata=event.metadata,
        topic=event.topic,
        partition=event.partition,
        offset=event.offset,
        position=position or _after(event),
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
    )
    envelope.recorded_at.FromDatetime(event.recorded_at)
    return envelope


def _after(event: StoredEvent) -> str:
    return Position.after(event.topic, event.partition, event.offset).encode()


def read_stream_from_pb(message: event_store_pb2.ReadStreamRequest) -> ReadStreamQuery:
    return ReadStreamQuery(
        category=message.category,
        stream_id=message.stream_id,
        from_version=message.from_version,
        max_count=message.max_count,
        backwards=message.backwards,
        min_position=message.min_position,
        wait_timeout_ms=message.wait_timeout_ms,
    )


def subscribe_from_pb(message: event_store_pb2.SubscribeRequest) -> SubscribeQuery:
    return SubscribeQuery(
        category=message.category,
        stream_id=message.stream_id,
        from_version=message.from_version,
        from_position=message.from_position,
    )


# --- REST: proto3 JSON, with JSON event data as JSON values -------------------------------------------


def message_to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def parse_json(body: dict[str, Any], message: Message) -> None:
    try:
        json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        violation = FieldViolation(_parse_error_field(str(exc)), str(exc))
        raise InvalidArgument(f"invalid request body: {exc}", violations=(violation,)) from None


# protobuf names the bad field "... at AppendEventsRequest.events[0].type", "Failed to parse limit field" or
# 'has no field named "nope" at "AppendEventsRequest.events[0]"'.
_PARSE_ERROR_UNKNOWN = re.compile(r'has no field named "([^"]*)" at "[A-Za-z_]\w*\.?([^"]*)"')
_PARSE_ERROR_AT = re.compile(r" at [A-Za-z_]\w*\.(\S+?)\.*(?:\s|$)")
_PARSE_ERROR_FIELD = re.compile(r"Failed to parse (\w+) field")


def _parse_error_field(message: str) -> str:
    if found := _PARSE_ERROR_UNKNOWN.search(message):
        return f"{found.group(2)}.{found.group(1)}" if found.group(2) else found.group(1)
    if found := _PARSE_ERROR_AT.search(message):
        return found.group(1)
    return ".".join(_PARSE_ERROR_FIELD.findall(message)) or "body"


def append_body_to_pb(body: Any, *, category: str, stream_id: str) -> event_store_pb2.AppendEventsRequest:
    """The REST body of AppendEvents: `{"events": [{"type", "data": <JSON>}], "expectedVersion": 3}`."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    body = dict(body)
    state = body.get("expectedState")
    if isinstance(state, str) and not state.startswith("EXPECTED_STATE_"):
        body["expectedState"] = f"EXPECTED_STATE_{state}"  # accept the contract's short names too
    events = body.get("events")
    if isinstance(events, list):
        body["events"] = [_event_body(event, i) for i, event in enumerate(events)]
    message = event_store_pb2.AppendEventsRequest()
    parse_json(body, message)
    message.category, message.stream_id = category, stream_id
    return message


def _event_body(event: Any, index: int) -> Any:
    if not isinstance(event, dict) or "data" not in event:
        return event
    event = dict(event)
    content_type = event.get("contentType") or event.get("content_type") or DEFAULT_CONTENT_TYPE
    if not isinstance(content_type, str):
        return event  # protobuf's parser names the bad field
    if is_json(content_type):
        event["data"] = base64.b64encode(json.dumps(event["data"]).encode()).decode()
    elif not isinstance(event["data"], str) or not _is_base64(event["data"]):
        raise InvalidArgument.field(f"events[{index}].data", "must be base64 for a non-JSON content type")
    return event


_URLSAFE = str.maketrans("-_", "+/")


def _is_base64(text: str) -> bool:
    """Standard or URL-safe base64, padded or not, as proto3 JSON accepts (protobuf drops bad characters)."""
    try:
        base64.b64decode(text.translate(_URLSAFE) + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def event_to_json(event: StoredEvent, *, position: str = "") -> dict[str, Any]:
    body = message_to_json(event_to_pb(event, position=position))
    if is_json(event.content_type):
        try:
            body["data"] = json.loads(event.data) if event.data else None
        except ValueError:
            pass  # stored as bytes that are not JSON (written by another producer): leave it base64
    return body


# --- ReadModels -------------------------------------------------------------------------------------------

_STATES = {
    "RUNNING": read_models_pb2.READ_MODEL_STATE_RUNNING,
    "REBUILDING": read_models_pb2.READ_MODEL_STATE_REBUILDING,
    "FAILED": read_models_pb2.READ_MODEL_STATE_FAILED,
}


def document_to_pb(document: Document) -> read_models_pb2.Document:
    row = document.row
    message = read_models_pb2.Document(
        read_model=document.read_model, key=row.key, version=row.version, position=row.position
    )
    message.data.update(row.data)
    message.updated_at.FromDatetime(row.updated_at)
    return message


def document_to_json(document: Document) -> dict[str, Any]:
    """`message_to_json(document_to_pb(document))` without building the message: the REST Get path.
    The same proto3 JSON: uint64 as a string, the timestamp in RFC 3339, Struct numbers as doubles."""
    row = document.row
    updated_at = timestamp_pb2.Timestamp()
    updated_at.FromDatetime(row.updated_at)
    body: dict[str, Any] = {"readModel": document.read_model, "key": row.key}
    if row.data:  # an empty Struct is an unset message field: proto3 JSON leaves it out
        body["data"] = _struct_json(row.data)
    body |= {"version": str(row.version), "position": row.position, "updatedAt": updated_at.ToJsonString()}
    return body


def _struct_json(value: Any) -> Any:
    """A JSON value as google.protobuf.Struct renders it: every number a double."""
    if isinstance(value, dict):
        return {k: _struct_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_struct_json(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def filters_from_pb(filters: Sequence[read_models_pb2.Filter]) -> list[FieldFilter]:
    out = []
    for i, f in enumerate(filters):
        if f.op == read_models_pb2.FILTER_OP_UNSPECIFIED:
            raise InvalidArgument.field(
                f"filters[{i}].op", "is required (EQ, NE, LT, LTE, GT, GTE, IN, PREFIX)"
            )
        value = json_format.MessageToDict(f.value) if f.HasField("value") else None
        out.append(
            FieldFilter(f.field, read_models_pb2.FilterOp.Name(f.op).removeprefix("FILTER_OP_"), value)
        )
    return out


def status_to_pb(status: ReadModelStatus) -> read_models_pb2.ReadModelStatus:
    message = read_models_pb2.ReadModelStatus(
        read_model=status.read_model,
        state=_STATES.get(status.state, read_models_pb2.READ_MODEL_STATE_UNSPECIFIED),
        position=status.position,
        lag=status.lag,
        documents=status.documents,
        category=status.category,
        error=status.error,
    )
    if status.rebuild is not None:
        message.rebuild.position = status.rebuild.position
        message.rebuild.lag = status.rebuild.lag
        message.rebuild.documents = status.rebuild.documents
    return message


def query_body_to_pb(body: Any, *, read_model: str) -> read_models_pb2.QueryRequest:
    """The REST body of Query (proto3 JSON); filter ops may be written short (`EQ`) as the contract does."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    body = dict(body)
    filters = body.get("filters")
    if isinstance(filters, list):
        body["filters"] = [_filter_body(f) for f in filters]
    message = read_models_pb2.QueryRequest()
    parse_json(body, message)
    message.read_model = read_model
    return message


def _filter_body(body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("op"), str) and not body["op"].startswith("FILTER_OP_"):
        return {**body, "op": f"FILTER_OP_{body['op']}"}
    return body


# --- RequestReply -----------------------------------------------------------------------------------------

_REPLY_STATUS = {
    ReplyStatus.PENDING: request_reply_pb2.REPLY_STATUS_PENDING,
    ReplyStatus.REPLIED: request_reply_pb2.REPLY_STATUS_REPLIED,
    ReplyStatus.TIMED_OUT: request_reply_pb2.REPLY_STATUS_TIMED_OUT,
}


def request_from_pb(message: request_reply_pb2.RequestMessage) -> Request:
    return Request(
        topic=message.topic,
        key=message.key,
        payload=message.payload,
        headers=dict(message.headers),
        timeout_ms=message.timeout_ms,
        correlation_id=message.correlation_id,
        idempotency_key=message.idempotency_key,
    )


def reply_to_pb(reply: Reply) -> request_reply_pb2.ReplyMessage:
    return request_reply_pb2.ReplyMessage(
        correlation_id=reply.correlation_id,
        status=_REPLY_STATUS[reply.status],
        payload=reply.payload,
        headers=dict(reply.headers),
        reply_topic=reply.reply_topic,
        partition=reply.partition,
        offset=reply.offset,
    )


def request_body_to_pb(body: Any, *, topic: str) -> request_reply_pb2.RequestMessage:
    """The REST body of Request: proto3 JSON, except that a `payload` that is not a string is a JSON value
    (sent as its UTF-8 JSON text); a string payload is base64, as proto3 JSON has it."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    body = dict(body)
    if "payload" in body and not isinstance(body["payload"], str):
        body["payload"] = base64.b64encode(json.dumps(body["payload"]).encode()).decode()
    message = request_reply_pb2.RequestMessage()
    parse_json(body, message)
    message.topic = topic
    return message


# --- Sagas -------------------------------------------------------------------------------------------

_MAX_SAFE_INTEGER = 2**53


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values, whole numbers as ints: a Struct keeps every number as a double, and a
    participant reading `"quantity": 3` should not get 3.0."""
    return _whole_numbers(json_format.MessageToDict(message))  # type: ignore[no-any-return]


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def start_saga_from_pb(message: sagas_pb2.StartSagaRequest) -> StartRequest:
    try:
        saga_input = struct_to_dict(message.input)
    except ValueError:  # a Struct number can be NaN or Infinity over gRPC; JSON has neither
        raise InvalidArgument.field("input", "NaN and Infinity are not JSON numbers") from None
    return StartRequest(
        saga_type=message.saga_type,
        input=saga_input,
        saga_id=message.saga_id,
        idempotency_key=message.idempotency_key,
        correlation_id=message.correlation_id,
    )


def saga_status_from_pb(status: int) -> str:
    """The domain's status name, "" for UNSPECIFIED (any status); an unknown number is refused."""
    if status not in sagas_pb2.SagaStatus.values():
        raise InvalidArgument.field("status", f"unknown value {status}")
    if status == sagas_pb2.SAGA_STATUS_UNSPECIFIED:
        return ""
    return sagas_pb2.SagaStatus.Name(status).removeprefix("SAGA_STATUS_")  # type: ignore[arg-type]


def saga_to_pb(saga: Saga) -> sagas_pb2.Saga:
    message = sagas_pb2.Saga(
        saga_id=saga.saga_id,
        saga_type=saga.saga_type,
        status=sagas_pb2.SagaStatus.Value(f"SAGA_STATUS_{saga.status.value}"),
        steps=[
            sagas_pb2.SagaStep(
                name=step.name,
                status=sagas_pb2.StepStatus.Value(f"STEP_STATUS_{step.status.value}"),
                attempts=step.attempts,
                error=step.error,
                compensation_attempts=step.compensation_attempts,
            )
            for step in saga.steps
        ],
        failure_reason=saga.failure_reason,
        correlation_id=saga.correlation_id,
    )
    message.context.update(saga.context)
    message.started_at.FromDatetime(saga.started_at)
    message.updated_at.FromDatetime(saga.updated_at)
    return message


def saga_to_json(saga: Saga) -> dict[str, Any]:
    """A saga as proto3 JSON, its context with whole numbers as ints."""
    body = message_to_json(saga_to_pb(saga))
    body["context"] = saga.context
    return body


def start_saga_body_to_pb(body: Any) -> sagas_pb2.StartSagaRequest:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    message = sagas_pb2.StartSagaRequest()
    parse_json(body, message)
    return message


# --- DeadLetters ---------------------------------------------------------------------------------------


def dead_letter_state_from_pb(state: int) -> DeadLetterState | None:
    """The domain's state, None for UNSPECIFIED (any state); an unknown number is refused."""
    if state not in dead_letters_pb2.DeadLetterState.values():
        raise InvalidArgument.field("state", f"unknown value {state}")
    if state == dead_letters_pb2.DEAD_LETTER_STATE_UNSPECIFIED:
        return None
    name = dead_letters_pb2.DeadLetterState.Name(state)  # type: ignore[arg-type]
    return DeadLetterState(name.removeprefix("DEAD_LETTER_STATE_"))


def dead_letter_filter_from_pb(
    message: dead_letters_pb2.ListDeadLettersRequest | dead_letters_pb2.ReprocessRequest,
) -> DeadLetterFilter:
    return DeadLetterFilter(
        original_topic=message.original_topic,
        error_class=message.error_class,
        key=message.key or None,
        since_ms=message.since.ToMilliseconds() if message.HasField("since") else None,
        until_ms=message.until.ToMilliseconds() if message.HasField("until") else None,
        state=dead_letter_state_from_pb(message.state),
    )


def reprocess_from_pb(message: dead_letters_pb2.ReprocessRequest) -> ReprocessRequest:
    return ReprocessRequest(
        dlt_topic=message.dlt_topic,
        ids=list(message.ids),
        filters=dead_letter_filter_from_pb(message),
        target_topic=message.target_topic,
        dry_run=message.dry_run,
        force=message.force,
    )


def reprocess_result_to_pb(result: ReprocessResult) -> dead_letters_pb2.ReprocessResponse:
    return dead_letters_pb2.ReprocessResponse(
        selected=result.selected, reprocessed=result.reprocessed, skipped=result.skipped, failed=result.failed
    )


def dead_letter_topic_to_pb(topic: DeadLetterTopic) -> dead_letters_pb2.DeadLetterTopic:
    return dead_letters_pb2.DeadLetterTopic(
        topic=topic.topic, partitions=topic.partitions, record_count=topic.record_count
    )


def _timestamp(ms: int | None) -> timestamp_pb2.Timestamp | None:
    if ms is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


_FORMATS = {
    DltFormat.KPG: dead_letters_pb2.DEAD_LETTER_FORMAT_KPG,
    DltFormat.SPRING: dead_letters_pb2.DEAD_LETTER_FORMAT_SPRING,
    DltFormat.JSON_ENVELOPE: dead_letters_pb2.DEAD_LETTER_FORMAT_JSON_ENVELOPE,
    DltFormat.UNKNOWN: dead_letters_pb2.DEAD_LETTER_FORMAT_UNKNOWN,
}


def dead_letter_to_pb(letter: DeadLetter) -> dead_letters_pb2.DeadLetter:
    details = letter.details
    headers: dict[str, bytes] = {}
    for name, raw in letter.headers:
        headers[name] = raw  # a repeated header: the last value, as the formats read it
    return dead_letters_pb2.DeadLetter(
        id=letter.id,
        dlt_topic=letter.dlt_topic,
        partition=letter.partition,
        offset=letter.offset,
        key=letter.key or b"",
        payload=details.payload or b"",
        headers=headers,
        original_topic=details.original_topic,
        original_partition=details.original_partition,
        original_offset=details.original_offset,
        original_timestamp=_timestamp(details.original_timestamp_ms),
        consumer_group=details.consumer_group,
        error_class=details.error_class,
        error_message=details.error_message,
        stack_trace=details.stack_trace,
        attempts=details.attempts,
        failed_at=_timestamp(details.failed_at_ms),
        state=dead_letters_pb2.DeadLetterState.Value(f"DEAD_LETTER_STATE_{letter.state.value}"),
        reprocess_count=letter.reprocess_count,
        format=_FORMATS[details.format],
    )


def dead_letter_topics_to_pb(
    topics: Sequence[DeadLetterTopic],
) -> dead_letters_pb2.ListDeadLetterTopicsResponse:
    return dead_letters_pb2.ListDeadLetterTopicsResponse(topics=[dead_letter_topic_to_pb(t) for t in topics])


def dead_letter_page_to_pb(page: DeadLetterPage) -> dead_letters_pb2.ListDeadLettersResponse:
    return dead_letters_pb2.ListDeadLettersResponse(
        dead_letters=[dead_letter_to_pb(d) for d in page.dead_letters], next_page_token=page.next_page_token
    )


def discard_result_to_pb(discarded: int) -> dead_letters_pb2.DiscardResponse:
    return dead_letters_pb2.DiscardResponse(discarded=discarded)


def reprocess_body_to_pb(body: Any, *, dlt_topic: str) -> dead_letters_pb2.ReprocessRequest:
    message = dead_letters_pb2.ReprocessRequest()
    _parse_dead_letters_body(body, message)
    message.dlt_topic = dlt_topic
    return message


def discard_body_to_pb(body: Any, *, dlt_topic: str) -> dead_letters_pb2.DiscardRequest:
    message = dead_letters_pb2.DiscardRequest()
    _parse_dead_letters_body(body, message)
    message.dlt_topic = dlt_topic
    return message


def _parse_dead_letters_body(body: Any, message: Message) -> None:
    """A REST body (proto3 JSON) into `message`; the DLT topic comes from the path, not the body."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    parse_json({k: v for k, v in body.items() if k not in ("dltTopic", "dlt_topic")}, message)


def timestamp_from_text(text: str, field: str) -> int | None:
    """Epoch ms of an RFC 3339 time given in a query string (None when empty)."""
    if not text:
        return None
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromJsonString(text)
    except ValueError:
        raise InvalidArgument.field(field, "must be an RFC 3339 time, such as 2026-12-04T12:00:00Z") from None
    return stamp.ToMilliseconds()


def dead_letter_state_from_text(text: str) -> DeadLetterState | None:
    name = text.removeprefix("DEAD_LETTER_STATE_")
    if name in ("", "UNSPECIFIED"):
        return None
    try:
        return DeadLetterState(name)
    except ValueError:
        raise InvalidArgument.field("state", "must be NEW, REPROCESSED or DISCARDED") from None
