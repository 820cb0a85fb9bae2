"""gRPC servicers: convert the request, call the service, convert the answer; nothing else.

Patterns that have not landed yet are served by placeholders that answer UNIMPLEMENTED with a message
naming the pattern, so clients generated today get a clear status instead of a hang or a 404. `bindings`
puts a pattern's servicer in place of its placeholder (see gateway/patterns.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from kpg.v1 import (
    dead_letters_pb2,
    dead_letters_pb2_grpc,
    event_store_pb2,
    event_store_pb2_grpc,
    read_models_pb2,
    read_models_pb2_grpc,
    request_reply_pb2,
    request_reply_pb2_grpc,
    sagas_pb2,
    sagas_pb2_grpc,
)

from gateway.errors import NotImplementedYet, SubscriberTooSlow
from gateway.services.events import EventStore
from gateway.services.read_models import ReadModels
from gateway.services.request_reply import RequestReply
from gateway.transport import convert


@dataclass(frozen=True, slots=True)
class ServiceBinding:
    """One gRPC service: its descriptor, the servicer object and the generated registration function."""

    descriptor: ServiceDescriptor
    servicer: object
    register: Callable[[Any, grpc.aio.Server], None]

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


def placeholder(descriptor: ServiceDescriptor, base: type, pattern: str) -> object:
    """A servicer whose every RPC answers UNIMPLEMENTED, naming the pattern that will bring it."""
    namespace: dict[str, Any] = {}
    for method in descriptor.methods:
        rpc = f"{descriptor.name}.{method.name}"
        namespace[method.name] = (
            _unimplemented_stream(rpc, pattern)
            if method.server_streaming
            else _unimplemented_unary(rpc, pattern)
        )
    return type(f"Placeholder{descriptor.name}", (base,), namespace)()


def _unimplemented_unary(rpc: str, pattern: str) -> Callable[..., Any]:
    async def method(self: object, request: object, context: object) -> object:
        raise NotImplementedYet(rpc, pattern)

    return method


def _unimplemented_stream(rpc: str, pattern: str) -> Callable[..., AsyncIterator[object]]:
    async def method(self: object, request: object, context: object) -> AsyncIterator[object]:
        raise NotImplementedYet(rpc, pattern)
        yield  # an async generator, as server-streaming handlers are

    return method


def default_bindings() -> list[ServiceBinding]:
    """Every service of the API; later patterns replace their placeholder with a real servicer."""
    specs = [
        (event_store_pb2, event_store_pb2_grpc, "EventStore", "append-event"),
        (read_models_pb2, read_models_pb2_grpc, "ReadModels", "query-read-model"),
        (sagas_pb2, sagas_pb2_grpc, "Sagas", "start-saga"),
        (request_reply_pb2, request_reply_pb2_grpc, "RequestReply", "request-reply"),
        (dead_letters_pb2, dead_letters_pb2_grpc, "DeadLetters", "DLT reprocessing"),
    ]
    bindings = []
    for pb2, pb2_grpc, name, pattern in specs:
        descriptor = pb2.DESCRIPTOR.services_by_name[name]
        base = getattr(pb2_grpc, f"{name}Servicer")
        register = getattr(pb2_grpc, f"add_{name}Servicer_to_server")
        bindings.append(ServiceBinding(descriptor, placeholder(descriptor, base, pattern), register))
    return bindings


class EventStoreServicer(event_store_pb2_grpc.EventStoreServicer):
    """kpg.v1.EventStore over gRPC: convert, call the service, convert back."""

    def __init__(self, store: EventStore, *, write_timeout_s: float) -> None:
        self._store = store
        self._write_timeout_s = write_timeout_s

    async def AppendEvents(
        self, request: event_store_pb2.AppendEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> event_store_pb2.AppendEventsResponse:
        return convert.append_result_to_pb(await self._store.append(convert.append_from_pb(request)))

    async def ReadStream(
        self, request: event_store_pb2.ReadStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> event_store_pb2.ReadStreamResponse:
        events, head = await self._store.read_stream(convert.read_stream_from_pb(request))
        return event_store_pb2.ReadStreamResponse(
            events=[convert.event_to_pb(e) for e in events], stream_version=head
        )

    async def Subscribe(  # type: ignore[override]  # a coroutine that writes, to time each write out
        self, request: event_store_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        events = await self._store.subscribe(convert.subscribe_from_pb(request))
        async for event, position in events:
            try:
                await asyncio.wait_for(
                    context.write(convert.event_to_pb(event, position=position)), self._write_timeout_s
                )
            except TimeoutError:
                raise SubscriberTooSlow(
                    f"the subscriber took no event for {self._write_timeout_s:.0f}s; resume from the last "
                    "position it received",
                    metadata={"position": position},
                ) from None


class ReadModelsServicer(read_models_pb2_grpc.ReadModelsServicer):
    """kpg.v1.ReadModels over gRPC."""

    def __init__(self, read_models: ReadModels) -> None:
        self._models = read_models

    async def Get(
        self, request: read_models_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> read_models_pb2.Document:
        document = await self._models.get(
            request.read_model,
            request.key,
            min_position=request.min_position,
            wait_timeout_ms=request.wait_timeout_ms,
        )
        return convert.document_to_pb(document)

    async def Query(
        self, request: read_models_pb2.QueryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> read_models_pb2.QueryResponse:
        documents, next_page_token, position = await self._models.query(
            request.read_model,
            filters=convert.filters_from_pb(request.filters),
            order_by=request.order_by,
            descending=request.descending,
            limit=request.limit,
            page_token=request.page_token,
            min_position=request.min_position,
            wait_timeout_ms=request.wait_timeout_ms,
        )
        return read_models_pb2.QueryResponse(
            documents=[convert.document_to_pb(d) for d in documents],
            next_page_token=next_page_token,
            position=position,
        )

    async def GetStatus(
        self, request: read_models_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> read_models_pb2.ReadModelStatus:
        return convert.status_to_pb(await self._models.status(request.read_model))

    async def Rebuild(
        self, request: read_models_pb2.RebuildRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> read_models_pb2.ReadModelStatus:
        return convert.status_to_pb(await self._models.rebuild(request.read_model))

    async def ListReadModels(
        self, request: read_models_pb2.ListReadModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> read_models_pb2.ListReadModelsResponse:
        statuses = await self._models.list()
        return read_models_pb2.ListReadModelsResponse(read_models=[convert.status_to_pb(s) for s in statuses])


class RequestReplyServicer(request_reply_pb2_grpc.RequestReplyServicer):
    """kpg.v1.RequestReply over gRPC."""

    def __init__(self, requests: RequestReply) -> None:
        self._requests = requests

    async def Request(
        self, request: request_reply_pb2.RequestMessage, context: grpc.aio.ServicerContext[Any, Any]
    ) -> request_reply_pb2.ReplyMessage:
        return convert.reply_to_pb(await self._requests.request(convert.request_from_pb(request)))

    async def SubmitRequest(
        self, request: request_reply_pb2.RequestMessage, context: grpc.aio.ServicerContext[Any, Any]
    ) -> request_reply_pb2.SubmitRequestResponse:
        correlation_id = await self._requests.submit(convert.request_from_pb(request))
        return request_reply_pb2.SubmitRequestResponse(correlation_id=correlation_id)

    async def GetReply(
        self, request: request_reply_pb2.GetReplyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> request_reply_pb2.ReplyMessage:
        reply = await self._requests.get_reply(request.correlation_id, request.wait_timeout_ms)
        return convert.reply_to_pb(reply)


def bindings(implemented: Mapping[str, object]) -> list[ServiceBinding]:
    """Every service of the API: those in `implemented` (servicers by full service name, such as
    "kpg.v1.EventStore") replace their placeholder; the others keep answering UNIMPLEMENTED."""
    defaults = default_bindings()
    unknown = set(implemented) - {b.full_name for b in defaults}
    if unknown:
        raise ValueError(f"no such gRPC service in the API: {', '.join(sorted(unknown))}")
    return [
        ServiceBinding(b.descriptor, implemented.get(b.full_name, b.servicer), b.register) for b in defaults
    ]
