"""Locust users for every pattern of the gateway, each over gRPC and over REST.

    .venv/bin/python loadtest/run_locust.py    # `make loadtest`: starts a gateway, runs this, summarizes
    make up && .venv/bin/python examples/inventory_responder.py &
    .venv/bin/python examples/participants.py all --bootstrap-servers 127.0.0.1:9092 &
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 30s --host http://127.0.0.1:8080

One user class per pattern and transport, with the definitions of examples/definitions.yaml (category
`orders`, read model `order_summary`, saga `place_order`, request topic `inventory.requests`):

- `AppendGrpc`, `AppendRest` (weight 3): AppendEvents of 1 event with the expected version (most), of 100
  events, and ReadStream of its own streams (whose head must be at least its last write);
- `ReadModelsGrpc`, `ReadModelsRest` (2): an OrderPlaced append, then Get with its `min_position` (the
  document must be there); Get of earlier keys; Query of its own orders (sometimes with `min_position`);
  GetStatus;
- `RequestReplyGrpc`, `RequestReplyRest` (2): Request (sync), and SubmitRequest + GetReply until replied, to
  the inventory responder;
- `SagasGrpc`, `SagasRest` (2): StartSaga, then WatchSaga (gRPC) or GetSaga polling (REST) to the final
  status (one in five is declined: COMPENSATED); ListSagas, GetSaga;
- `DeadLettersGrpc`, `DeadLettersRest` (1): ListDeadLetterTopics, ListDeadLetters (pages of 20),
  GetDeadLetter: read-only.

Every task carries its pattern's tag (`append`, `read-models`, `request-reply`, `sagas`, `dead-letters`) and
its transport's (`grpc`, `rest`): `--tags sagas`, `--tags grpc` or `--exclude-tags dead-letters` choose the
scenarios, and the user classes left without a task are not started.

gRPC users follow locust's gRPC pattern: grpc's sync client made cooperative with gevent, its channel wrapped
by an interceptor that fires locust's `request` event for every call (type `grpc`, named `Service.Method`;
a few calls are named apart, such as `EventStore.AppendEvents (100 events)`; a server stream is one request
lasting until its last message). REST users are FastHttpUsers; each request is named by its route. What a
scenario checks in an answer (a saga's final status, the document after a read-your-writes Get, ...) fails a
row of type `check` when it does not hold; a saga's whole run is a row of type `saga`.

Settings (environment): `KPG_TARGET` the gRPC host:port (default 127.0.0.1:50051); `--host` or
`KPG_REST_URL` the REST base URL (default http://127.0.0.1:8080); `KPG_LOADTEST_REQUEST_TOPIC` (default
inventory.requests) and `KPG_LOADTEST_DLT_TOPIC` (default orders.events.DLT; set empty, the dead-letter
users only list the topics); `KPG_LOADTEST_WAIT_MS`, the most a user waits between tasks (default 50).
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode

import gevent  # type: ignore[import-untyped]
import grpc
import grpc.experimental.gevent as grpc_gevent
from google.protobuf import json_format
from kpg.v1 import dead_letters_pb2 as dl
from kpg.v1 import dead_letters_pb2_grpc as dl_grpc
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import event_store_pb2_grpc as es_grpc
from kpg.v1 import read_models_pb2 as rm
from kpg.v1 import read_models_pb2_grpc as rm_grpc
from kpg.v1 import request_reply_pb2 as rr
from kpg.v1 import request_reply_pb2_grpc as rr_grpc
from kpg.v1 import sagas_pb2 as sg
from kpg.v1 import sagas_pb2_grpc as sg_grpc
from locust import User, between, events, tag, task
from locust.contrib.fasthttp import FastHttpSession, FastHttpUser
from locust.env import Environment

grpc_gevent.init_gevent()  # before any channel: grpc's sync client then yields to locust's other greenlets

GRPC_TARGET = os.environ.get("KPG_TARGET") or os.environ.get("KPG_LOADTEST_GRPC_TARGET", "127.0.0.1:50051")
REST_URL = os.environ.get("KPG_REST_URL", "http://127.0.0.1:8080")
CATEGORY = "orders"
READ_MODEL = "order_summary"
SAGA = "place_order"
REQUEST_TOPIC = os.environ.get("KPG_LOADTEST_REQUEST_TOPIC", "inventory.requests")
DLT_TOPIC = os.environ.get("KPG_LOADTEST_DLT_TOPIC", "orders.events.DLT")
WAIT_S = float(os.environ.get("KPG_LOADTEST_WAIT_MS", "50")) / 1000

CALL_TIMEOUT_S = 30.0  # a gRPC deadline; REST uses FastHttpUser's network timeout (60 s)
READ_WAIT_MS = 10_000  # how long a read with min_position may wait for the model (the default is 5000)
REPLY_TIMEOUT_MS = 10_000
SAGA_TIMEOUT_S = 60.0
STREAM_MAX_VERSION = 200  # then an append user starts a new stream: documents and streams stay small
SKUS = {"apple": 12, "pear": 0, "kiwi": 0}  # examples/inventory_responder.py's stock (unknown: 0)


# --- recording: checks, and gRPC calls through an interceptor -----------------------------------------------


def record(
    environment: Environment,
    request_type: str,
    name: str,
    response_time_ms: float,
    length: int,
    exception: Exception | None,
) -> None:
    """Fire locust's `request` event: one row of its statistics."""
    hook: Any = environment.events.request  # an untyped hook
    hook.fire(
        request_type=request_type,
        name=name,
        response_time=response_time_ms,
        response_length=length,
        exception=exception,
        context={},
    )


def check(environment: Environment, ok: bool, name: str, what: str) -> bool:
    """A scenario's check of an answer: a failed row of type `check` named `name` when it does not hold."""
    if not ok:
        record(environment, "check", name, 0, 0, AssertionError(what))
    return ok


_names = threading.local()  # greenlet-local: locust's gevent patches threading


@contextmanager
def request_name(name: str) -> Iterator[None]:
    """Report the gRPC calls made in this block as `name` rather than `Service.Method`."""
    previous = getattr(_names, "name", None)
    _names.name = name
    try:
        yield
    finally:
        _names.name = previous


def _call_name(details: grpc.ClientCallDetails) -> str:
    override: str | None = getattr(_names, "name", None)
    if override:
        return override
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    service, _, rpc = method.rpartition("/")  # "/kpg.v1.EventStore/AppendEvents"
    return f"{service.rsplit('.', 1)[-1]}.{rpc}"


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Fires locust's `request` event for each gRPC call made on the channel it wraps."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def record(self, name: str, started: float, length: int, exception: Exception | None) -> None:
        record(self.environment, "grpc", name, (time.perf_counter() - started) * 1000, length, exception)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        name, started = _call_name(client_call_details), time.perf_counter()
        call = continuation(client_call_details, request)
        exception = call.exception()  # waits for the outcome
        self.record(name, started, 0 if exception else call.result().ByteSize(), exception)
        return call

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        name, started = _call_name(client_call_details), time.perf_counter()
        return _RecordedStream(self, name, started, continuation(client_call_details, request))


class _RecordedStream:
    """A server stream, recorded as one request when it ends (its time: from the call to the end)."""

    def __init__(self, interceptor: LocustInterceptor, name: str, started: float, call: Any) -> None:
        self._interceptor, self._name, self._started, self._call = interceptor, name, started, call
        self._length = 0
        self._recorded = False

    def __iter__(self) -> _RecordedStream:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except StopIteration:
            self._record(None)
            raise
        except grpc.RpcError as exc:
            self._record(exc)
            raise
        self._length += message.ByteSize()
        return message

    def cancel(self) -> bool:
        self._record(None)
        return bool(self._call.cancel())

    def _record(self, exception: Exception | None) -> None:
        if not self._recorded:
            self._recorded = True
            self._interceptor.record(self._name, self._started, self._length, exception)


# --- one API, over gRPC and over REST -----------------------------------------------------------------------
# Each method returns what the scenario needs, or None when the call failed (locust has recorded why).


@dataclass(frozen=True)
class Appended:
    last_version: int
    position: str


@dataclass(frozen=True)
class DeadLetterRef:
    partition: int
    offset: int


Event = tuple[str, dict[str, Any]]  # type, JSON data


class Api(Protocol):
    def append(self, stream: str, events: list[Event], *, expected: int, name: str) -> Appended | None: ...
    def read_stream(self, stream: str, *, backwards: bool) -> int | None: ...
    def get_document(self, key: str, *, min_position: str) -> dict[str, Any] | None: ...
    def query(self, customer: str, *, min_position: str) -> list[dict[str, Any]] | None: ...
    def read_model_status(self) -> None: ...
    def request(self, payload: dict[str, Any]) -> dict[str, Any] | None: ...
    def submit(self, payload: dict[str, Any]) -> str | None: ...
    def get_reply(self, correlation_id: str) -> tuple[str, dict[str, Any]] | None: ...
    def start_saga(self, saga_input: dict[str, Any]) -> str | None: ...
    def get_saga(self, saga_id: str) -> str | None: ...
    def run_saga(self, saga_id: str) -> str | None: ...
    def list_sagas(self) -> None: ...
    def list_dead_letter_topics(self) -> list[str] | None: ...
    def list_dead_letters(self, page_token: str) -> tuple[list[DeadLetterRef], str] | None: ...
    def get_dead_letter(self, ref: DeadLetterRef) -> None: ...


def _short(status_name: str, prefix: str) -> str:
    return status_name.removeprefix(prefix)


def _json_payload(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class GrpcApi:
    def __init__(self, channel: grpc.Channel) -> None:
        self.events = es_grpc.EventStoreStub(channel)
        self.read_models = rm_grpc.ReadModelsStub(channel)
        self.requests = rr_grpc.RequestReplyStub(channel)
        self.sagas = sg_grpc.SagasStub(channel)
        self.dead_letters = dl_grpc.DeadLettersStub(channel)

    def append(self, stream: str, events: list[Event], *, expected: int, name: str) -> Appended | None:
        request = es.AppendEventsRequest(
            category=CATEGORY,
            stream_id=stream,
            events=[es.EventData(type=t, data=json.dumps(data).encode()) for t, data in events],
        )
        if expected:
            request.expected_version = expected
        else:
            request.expected_state = es.EXPECTED_STATE_NO_STREAM
        try:
            with request_name(name):
                answer = self.events.AppendEvents(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return Appended(answer.last_version, answer.position)

    def read_stream(self, stream: str, *, backwards: bool) -> int | None:
        request = es.ReadStreamRequest(category=CATEGORY, stream_id=stream, max_count=20, backwards=backwards)
        try:
            return int(self.events.ReadStream(request, timeout=CALL_TIMEOUT_S).stream_version)
        except grpc.RpcError:
            return None

    def get_document(self, key: str, *, min_position: str) -> dict[str, Any] | None:
        request = rm.GetDocumentRequest(read_model=READ_MODEL, key=key)
        if min_position:
            request.min_position, request.wait_timeout_ms = min_position, READ_WAIT_MS
        try:
            with request_name("ReadModels.Get (min_position)" if min_position else "ReadModels.Get"):
                document = self.read_models.Get(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return dict(json_format.MessageToDict(document.data))

    def query(self, customer: str, *, min_position: str) -> list[dict[str, Any]] | None:
        request = rm.QueryRequest(read_model=READ_MODEL, order_by="total", descending=True, limit=20)
        condition = request.filters.add(field="customer", op=rm.FILTER_OP_EQ)
        condition.value.string_value = customer
        if min_position:
            request.min_position, request.wait_timeout_ms = min_position, READ_WAIT_MS
        try:
            with request_name("ReadModels.Query (min_position)" if min_position else "ReadModels.Query"):
                answer = self.read_models.Query(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return [dict(json_format.MessageToDict(d.data)) for d in answer.documents]

    def read_model_status(self) -> None:
        try:
            self.read_models.GetStatus(rm.GetStatusRequest(read_model=READ_MODEL), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            pass

    def _message(self, payload: dict[str, Any]) -> Any:
        return rr.RequestMessage(
            topic=REQUEST_TOPIC, payload=json.dumps(payload).encode(), timeout_ms=REPLY_TIMEOUT_MS
        )

    def request(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        try:
            reply = self.requests.Request(self._message(payload), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return _json_payload(reply.payload)

    def submit(self, payload: dict[str, Any]) -> str | None:
        try:
            return str(
                self.requests.SubmitRequest(self._message(payload), timeout=CALL_TIMEOUT_S).correlation_id
            )
        except grpc.RpcError:
            return None

    def get_reply(self, correlation_id: str) -> tuple[str, dict[str, Any]] | None:
        request = rr.GetReplyRequest(correlation_id=correlation_id, wait_timeout_ms=5000)
        try:
            reply = self.requests.GetReply(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return _short(rr.ReplyStatus.Name(reply.status), "REPLY_STATUS_"), _json_payload(reply.payload)

    def start_saga(self, saga_input: dict[str, Any]) -> str | None:
        request = sg.StartSagaRequest(saga_type=SAGA, idempotency_key=str(uuid.uuid4()))
        request.input.update(saga_input)
        try:
            return str(self.sagas.StartSaga(request, timeout=CALL_TIMEOUT_S).saga_id)
        except grpc.RpcError:
            return None

    def get_saga(self, saga_id: str) -> str | None:
        try:
            saga = self.sagas.GetSaga(sg.GetSagaRequest(saga_id=saga_id), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return _short(sg.SagaStatus.Name(saga.status), "SAGA_STATUS_")

    def run_saga(self, saga_id: str) -> str | None:
        """WatchSaga until the stream ends (after the final status); the last status seen."""
        status = None
        try:
            for saga in self.sagas.WatchSaga(sg.WatchSagaRequest(saga_id=saga_id), timeout=SAGA_TIMEOUT_S):
                status = _short(sg.SagaStatus.Name(saga.status), "SAGA_STATUS_")
        except grpc.RpcError:
            return None
        return status

    def list_sagas(self) -> None:
        try:
            self.sagas.ListSagas(sg.ListSagasRequest(saga_type=SAGA, limit=20), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            pass

    def list_dead_letter_topics(self) -> list[str] | None:
        try:
            answer = self.dead_letters.ListDeadLetterTopics(
                dl.ListDeadLetterTopicsRequest(), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError:
            return None
        return [t.topic for t in answer.topics]

    def list_dead_letters(self, page_token: str) -> tuple[list[DeadLetterRef], str] | None:
        request = dl.ListDeadLettersRequest(dlt_topic=DLT_TOPIC, limit=20, page_token=page_token)
        try:
            page = self.dead_letters.ListDeadLetters(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return [DeadLetterRef(d.partition, d.offset) for d in page.dead_letters], str(page.next_page_token)

    def get_dead_letter(self, ref: DeadLetterRef) -> None:
        request = dl.GetDeadLetterRequest(dlt_topic=DLT_TOPIC, partition=ref.partition, offset=ref.offset)
        try:
            self.dead_letters.GetDeadLetter(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            pass


class RestApi:
    def __init__(self, client: FastHttpSession) -> None:
        self.client = client

    def _call(
        self,
        method: str,
        path: str,
        name: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        expect: int = 200,
    ) -> dict[str, Any] | None:
        """One request, named `name`: its JSON body, or None (a failure) if it answered anything else."""
        with self.client.request(
            method, path, name=name, json=body, headers=headers, catch_response=True
        ) as response:
            if response.status_code != expect:
                text = (response.text or "")[:300]
                response.failure(f"HTTP {response.status_code}: {text}")
                return None
            try:
                answer = response.json()
            except ValueError:
                response.failure("the answer is not JSON")
                return None
            response.success()
            return answer if isinstance(answer, dict) else {}

    def append(self, stream: str, events: list[Event], *, expected: int, name: str) -> Appended | None:
        body: dict[str, Any] = {"events": [{"type": t, "data": data} for t, data in events]}
        if expected:
            body["expectedVersion"] = expected
        else:
            body["expectedState"] = "NO_STREAM"
        route = "/v1/streams/{category}/{stream_id}/events"
        path = f"/v1/streams/{CATEGORY}/{quote(stream, safe='')}/events"
        answer = self._call("POST", path, name.replace("EventStore.AppendEvents", route), body=body)
        return None if answer is None else Appended(int(answer["lastVersion"]), answer["position"])

    def read_stream(self, stream: str, *, backwards: bool) -> int | None:
        query = urlencode({"maxCount": 20, "backwards": str(backwards).lower()})
        path = f"/v1/streams/{CATEGORY}/{quote(stream, safe='')}/events?{query}"
        answer = self._call("GET", path, "/v1/streams/{category}/{stream_id}/events")
        return None if answer is None else int(answer["streamVersion"])

    def get_document(self, key: str, *, min_position: str) -> dict[str, Any] | None:
        path = f"/v1/read-models/{READ_MODEL}/documents/{quote(key, safe='')}"
        name = "/v1/read-models/{read_model}/documents/{key}"
        if min_position:
            path += "?" + urlencode({"minPosition": min_position, "waitTimeoutMs": READ_WAIT_MS})
            name += " (min_position)"
        answer = self._call("GET", path, name)
        return None if answer is None else dict(answer.get("data") or {})

    def query(self, customer: str, *, min_position: str) -> list[dict[str, Any]] | None:
        body: dict[str, Any] = {
            "filters": [{"field": "customer", "op": "EQ", "value": customer}],
            "orderBy": "total",
            "descending": True,
            "limit": 20,
        }
        name = "/v1/read-models/{read_model}/query"
        if min_position:
            body |= {"minPosition": min_position, "waitTimeoutMs": READ_WAIT_MS}
            name += " (min_position)"
        answer = self._call("POST", f"/v1/read-models/{READ_MODEL}/query", name, body=body)
        return None if answer is None else [dict(d.get("data") or {}) for d in answer.get("documents", [])]

    def read_model_status(self) -> None:
        self._call("GET", f"/v1/read-models/{READ_MODEL}", "/v1/read-models/{read_model}")

    def _reply(self, answer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        payload = base64.b64decode(answer.get("payload") or "")
        return _short(str(answer.get("status", "")), "REPLY_STATUS_"), _json_payload(payload)

    def request(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        body = {"payload": payload, "timeoutMs": REPLY_TIMEOUT_MS}
        path = f"/v1/requests/{quote(REQUEST_TOPIC, safe='')}"
        answer = self._call("POST", path, "/v1/requests/{topic}", body=body)
        return None if answer is None else self._reply(answer)[1]

    def submit(self, payload: dict[str, Any]) -> str | None:
        body = {"payload": payload, "timeoutMs": REPLY_TIMEOUT_MS}
        path = f"/v1/requests/{quote(REQUEST_TOPIC, safe='')}"
        name = "/v1/requests/{topic} (respond-async)"
        answer = self._call("POST", path, name, body=body, headers={"Prefer": "respond-async"}, expect=202)
        return None if answer is None else str(answer["correlationId"])

    def get_reply(self, correlation_id: str) -> tuple[str, dict[str, Any]] | None:
        path = f"/v1/replies/{quote(correlation_id, safe='')}?waitTimeoutMs=5000"
        answer = self._call("GET", path, "/v1/replies/{correlation_id}")
        return None if answer is None else self._reply(answer)

    def start_saga(self, saga_input: dict[str, Any]) -> str | None:
        body = {"sagaType": SAGA, "input": saga_input}
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        answer = self._call("POST", "/v1/sagas", "/v1/sagas", body=body, headers=headers)
        return None if answer is None else str(answer["sagaId"])

    def get_saga(self, saga_id: str) -> str | None:
        answer = self._call("GET", f"/v1/sagas/{quote(saga_id, safe='')}", "/v1/sagas/{saga_id}")
        return None if answer is None else _short(str(answer.get("status", "")), "SAGA_STATUS_")

    def run_saga(self, saga_id: str) -> str | None:
        """GetSaga every 50 ms until a final status (or SAGA_TIMEOUT_S): the last status seen."""
        deadline = time.monotonic() + SAGA_TIMEOUT_S
        while True:
            status = self.get_saga(saga_id)
            if status not in {"RUNNING", "COMPENSATING"} or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def list_sagas(self) -> None:
        self._call("GET", f"/v1/sagas?sagaType={SAGA}&limit=20", "/v1/sagas")

    def list_dead_letter_topics(self) -> list[str] | None:
        answer = self._call("GET", "/v1/dead-letters", "/v1/dead-letters")
        return None if answer is None else [t["topic"] for t in answer.get("topics", [])]

    def list_dead_letters(self, page_token: str) -> tuple[list[DeadLetterRef], str] | None:
        query = urlencode({"limit": 20, **({"pageToken": page_token} if page_token else {})})
        path = f"/v1/dead-letters/{quote(DLT_TOPIC, safe='')}?{query}"
        answer = self._call("GET", path, "/v1/dead-letters/{dlt_topic}")
        if answer is None:
            return None
        refs = [DeadLetterRef(int(d["partition"]), int(d["offset"])) for d in answer.get("deadLetters", [])]
        return refs, str(answer.get("nextPageToken", ""))

    def get_dead_letter(self, ref: DeadLetterRef) -> None:
        path = f"/v1/dead-letters/{quote(DLT_TOPIC, safe='')}/{ref.partition}/{ref.offset}"
        self._call("GET", path, "/v1/dead-letters/{dlt_topic}/{partition}/{offset}")


# --- transports: what a concrete user class is made of ------------------------------------------------------

UserT = TypeVar("UserT", bound=type[User])


def transport(name: str) -> Callable[[UserT], UserT]:
    """Tag every task of a user class with its transport. Each class gets its own copy of its scenario's
    tasks (the gRPC and REST classes share the functions), so the tags of one do not leak to the other."""

    def decorate(cls: UserT) -> UserT:
        copies: dict[Any, Any] = {}

        def copy(function: Any) -> Any:
            if function not in copies:

                def run(user: User) -> None:
                    function(user)

                run.__name__ = run.__qualname__ = function.__name__
                run.locust_tag_set = {*getattr(function, "locust_tag_set", ()), name}  # type: ignore[attr-defined]
                copies[function] = run
            return copies[function]

        cls.tasks = [copy(t) for t in cls.tasks]
        return cls

    return decorate


class GrpcUser(User):
    """A gRPC channel of its own, wrapped by the locust interceptor."""

    abstract = True
    wait_time = between(0, WAIT_S)
    api: Api

    def on_start(self) -> None:
        channel = grpc.insecure_channel(GRPC_TARGET)
        self.channel = grpc.intercept_channel(channel, LocustInterceptor(self.environment))
        self.api = GrpcApi(self.channel)
        super().on_start()

    def on_stop(self) -> None:
        self.channel.close()


class RestUser(FastHttpUser):
    abstract = True
    host = REST_URL  # --host overrides it
    wait_time = between(0, WAIT_S)
    api: Api

    def on_start(self) -> None:
        self.api = RestApi(self.client)
        super().on_start()


def _only_users_with_tasks(environment: Environment, **_kwargs: Any) -> None:
    """Start no user of a class that --tags/--exclude-tags leave without a task (it would only fail)."""
    options = environment.parsed_options
    tags = set(options.tags) if options is not None and options.tags else None
    excluded = set(options.exclude_tags) if options is not None and options.exclude_tags else set()

    def runs(task: Any) -> bool:
        tagged = set(getattr(task, "locust_tag_set", ()))
        return (tags is None or bool(tagged & tags)) and not tagged & excluded

    kept = [u for u in environment.user_classes if any(runs(t) for t in u.tasks)]
    if kept:  # else locust says what is wrong
        environment.user_classes[:] = kept


def _fresh_clock(**_kwargs: Any) -> None:
    """gevent's loop caches its clock, and loading this file (grpc, protobuf, the stubs) holds the loop for
    seconds on a busy machine: locust's --run-time timer, armed just after `init`, would end the run early."""
    gevent.get_hub().loop.update_now()


_hooks: Any = events  # untyped hooks
_hooks.init.add_listener(_fresh_clock)
_hooks.init.add_listener(_only_users_with_tasks)


# --- the scenarios ------------------------------------------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class AppendScenario(User):
    """AppendEvents with the expected version to streams only this user writes (a conflict would be a bug),
    100-event appends, and ReadStream, whose head must be at least the last version this user appended."""

    abstract = True
    weight = 3
    api: Api

    def on_start(self) -> None:
        self.customer = _unique("lt")
        self.heads: list[tuple[str, int]] = [(_unique(self.customer), 0) for _ in range(8)]

    def _slot(self) -> tuple[int, str, int]:
        slot = random.randrange(len(self.heads))
        stream, head = self.heads[slot]
        if head >= STREAM_MAX_VERSION:
            stream, head = _unique(self.customer), 0
            self.heads[slot] = (stream, head)
        return slot, stream, head

    def _append(self, events: list[Event], name: str) -> None:
        slot, stream, head = self._slot()
        if head == 0:
            events = [("OrderPlaced", {"customer": self.customer, "total": 10}), *events[1:]]
        appended = self.api.append(stream, events, expected=head, name=name)
        if appended is not None:
            check(
                self.environment,
                appended.last_version == head + len(events),
                "EventStore: versions answered",
                f"{stream}: appended {len(events)} after {head}, answered {appended.last_version}",
            )
            self.heads[slot] = (stream, appended.last_version)

    @tag("append")
    @task(10)
    def append_one(self) -> None:
        item = {"sku": random.choice(list(SKUS)), "quantity": random.randint(1, 3)}
        self._append([("ItemAdded", {"item": item})], "EventStore.AppendEvents")

    @tag("append")
    @task(1)
    def append_hundred(self) -> None:
        # A type the read model ignores: the batch loads the log and the stream index, not the documents.
        notes = [("OrderNoteAdded", {"note": f"note {i}", "by": self.customer}) for i in range(100)]
        self._append(notes, "EventStore.AppendEvents (100 events)")

    @tag("append")
    @task(4)
    def read_stream(self) -> None:
        written = [(stream, head) for stream, head in self.heads if head]
        if not written:
            return self.append_one()
        stream, head = random.choice(written)
        seen = self.api.read_stream(stream, backwards=random.random() < 0.5)
        if seen is not None:
            check(
                self.environment,
                seen >= head,
                "EventStore: ReadStream head after an append",
                f"{stream}: head {seen} after an append answered {head}",
            )


class ReadModelsScenario(User):
    """Orders placed by this user (OrderPlaced appends), read back from `order_summary`: Get with the
    append's position must find the document; Get of earlier keys; Query of this user's orders, whose count
    (up to the limit of 20) must be all of them when it waits for the last position."""

    abstract = True
    weight = 2
    api: Api

    def on_start(self) -> None:
        self.customer = _unique("lt")
        self.keys: deque[str] = deque(maxlen=100)
        self.placed = 0
        self.position = ""

    @tag("read-models")
    @task(3)
    def place_then_get(self) -> None:
        key = _unique(self.customer)
        total = random.randint(1, 500)
        order = {"customer": self.customer, "total": total}
        appended = self.api.append(key, [("OrderPlaced", order)], expected=0, name="EventStore.AppendEvents")
        if appended is None:
            return
        self.placed += 1
        self.position = appended.position
        document = self.api.get_document(key, min_position=appended.position)
        if document is None:
            return
        check(
            self.environment,
            document.get("status") == "PLACED" and document.get("customer") == self.customer,
            "ReadModels: Get after an append",
            f"{key}: {document}",
        )
        self.keys.append(key)

    @tag("read-models")
    @task(4)
    def get(self) -> None:
        if not self.keys:
            return self.place_then_get()
        key = random.choice(self.keys)
        document = self.api.get_document(key, min_position="")
        if document is not None:
            check(
                self.environment,
                bool(document),
                "ReadModels: Get of a placed order",
                f"{key}: empty document",
            )

    @tag("read-models")
    @task(2)
    def query(self) -> None:
        wait = bool(self.position) and random.random() < 0.5
        documents = self.api.query(self.customer, min_position=self.position if wait else "")
        if documents is not None and wait:
            check(
                self.environment,
                len(documents) == min(self.placed, 20),
                "ReadModels: Query after appends",
                f"{self.customer}: {len(documents)} documents, {self.placed} orders placed",
            )

    @tag("read-models")
    @task(1)
    def status(self) -> None:
        self.api.read_model_status()


class RequestReplyScenario(User):
    """Request-reply to the inventory responder: sync Request, and SubmitRequest then GetReply (waiting up
    to 5 s a call) until it is replied; the reply must be about the SKU asked."""

    abstract = True
    weight = 2
    api: Api

    def _check_reply(self, sku: str, reply: dict[str, Any]) -> None:
        check(
            self.environment,
            reply.get("sku") == sku and reply.get("available") == SKUS[sku],
            "RequestReply: the reply",
            f"asked about {sku}, answered {reply}",
        )

    @tag("request-reply")
    @task(3)
    def request(self) -> None:
        sku = random.choice(list(SKUS))
        reply = self.api.request({"sku": sku})
        if reply is not None:
            self._check_reply(sku, reply)

    @tag("request-reply")
    @task(2)
    def submit_then_get_reply(self) -> None:
        sku = random.choice(list(SKUS))
        correlation_id = self.api.submit({"sku": sku})
        if correlation_id is None:
            return
        deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000 + 5
        while time.monotonic() < deadline:
            answer = self.api.get_reply(correlation_id)
            if answer is None:
                return
            status, reply = answer
            if status != "PENDING":
                if check(
                    self.environment,
                    status == "REPLIED",
                    "RequestReply: reply status",
                    f"{correlation_id}: {status}",
                ):
                    self._check_reply(sku, reply)
                return
        check(self.environment, False, "RequestReply: reply status", f"{correlation_id}: still PENDING")


class SagasScenario(User):
    """`place_order` sagas run by examples/participants.py: StartSaga, then WatchSaga (gRPC) or GetSaga
    polling (REST) until the final status. One in five is declined (amount over 1000): COMPENSATED, the
    others COMPLETED. Each whole saga is also a row of type `saga`, failed when it ends otherwise."""

    abstract = True
    weight = 2
    api: Api

    def on_start(self) -> None:
        self.customer = _unique("lt")
        self.saga_ids: deque[str] = deque(maxlen=50)

    @tag("sagas")
    @task(4)
    def place_order(self) -> None:
        declined = random.random() < 0.2
        expected = "COMPENSATED" if declined else "COMPLETED"
        order = {"sku": "A-1", "quantity": 2, "amount": 5000 if declined else 40, "customer": self.customer}
        started = time.perf_counter()
        saga_id = self.api.start_saga(order)
        if saga_id is None:
            return
        status = self.api.run_saga(saga_id)
        if status is None:
            return
        self.saga_ids.append(saga_id)
        failure = None if status == expected else AssertionError(f"{saga_id} ended {status}")
        took_ms = (time.perf_counter() - started) * 1000
        record(self.environment, "saga", f"{SAGA} start to {expected}", took_ms, 0, failure)

    @tag("sagas")
    @task(1)
    def list_sagas(self) -> None:
        self.api.list_sagas()

    @tag("sagas")
    @task(1)
    def get_saga(self) -> None:
        if not self.saga_ids:
            return self.place_order()
        saga_id = random.choice(self.saga_ids)
        status = self.api.get_saga(saga_id)
        if status is not None:
            final = status in {"COMPLETED", "COMPENSATED"}
            check(self.environment, final, "Sagas: GetSaga of a finished saga", f"{saga_id}: {status}")


class DeadLettersScenario(User):
    """Read-only: ListDeadLetterTopics, pages of ListDeadLetters on KPG_LOADTEST_DLT_TOPIC (the first, or one
    whose token an earlier page gave), and GetDeadLetter of a listed record. With KPG_LOADTEST_DLT_TOPIC set
    empty (the runner does so when the gateway has no such topic), only the topics are listed."""

    abstract = True
    weight = 1
    api: Api

    def on_start(self) -> None:
        self.tokens: deque[str] = deque([""], maxlen=20)
        self.refs: deque[DeadLetterRef] = deque(maxlen=100)

    @tag("dead-letters")
    @task(1)
    def list_topics(self) -> None:
        self.api.list_dead_letter_topics()

    @tag("dead-letters")
    @task(4)
    def list_dead_letters(self) -> None:
        if not DLT_TOPIC:
            return self.list_topics()
        page = self.api.list_dead_letters(random.choice(self.tokens))
        if page is not None:
            refs, next_token = page
            self.refs.extend(refs)
            if next_token and next_token not in self.tokens:
                self.tokens.append(next_token)

    @tag("dead-letters")
    @task(2)
    def get_dead_letter(self) -> None:
        if not self.refs:
            return self.list_dead_letters()
        self.api.get_dead_letter(random.choice(self.refs))


# --- the user classes locust runs ---------------------------------------------------------------------------


@transport("grpc")
class AppendGrpc(GrpcUser, AppendScenario):
    pass


@transport("rest")
class AppendRest(RestUser, AppendScenario):
    pass


@transport("grpc")
class ReadModelsGrpc(GrpcUser, ReadModelsScenario):
    pass


@transport("rest")
class ReadModelsRest(RestUser, ReadModelsScenario):
    pass


@transport("grpc")
class RequestReplyGrpc(GrpcUser, RequestReplyScenario):
    pass


@transport("rest")
class RequestReplyRest(RestUser, RequestReplyScenario):
    pass


@transport("grpc")
class SagasGrpc(GrpcUser, SagasScenario):
    pass


@transport("rest")
class SagasRest(RestUser, SagasScenario):
    pass


@transport("grpc")
class DeadLettersGrpc(GrpcUser, DeadLettersScenario):
    pass


@transport("rest")
class DeadLettersRest(RestUser, DeadLettersScenario):
    pass
