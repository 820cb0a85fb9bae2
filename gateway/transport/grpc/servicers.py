"""gRPC servicers: convert the request, call the service, convert the answer; nothing else.

Patterns that have not landed yet are served by placeholders that answer UNIMPLEMENTED with a message
naming the pattern, so clients generated today get a clear status instead of a hang or a 404.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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

from gateway.errors import NotImplementedYet


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
