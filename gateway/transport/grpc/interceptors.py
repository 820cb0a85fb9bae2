"""The one interceptor chain every RPC passes through: metrics, then the contract's error mapping.

A `GatewayError` becomes its gRPC status with `google.rpc.ErrorInfo` (domain `kpg`) and, for bad
fields, `google.rpc.BadRequest` in the status details. Anything else is a bug: logged, INTERNAL.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.errors import ERROR_DOMAIN, GatewayError
from gateway.observability import observe

log = logging.getLogger(__name__)


def to_status(error: GatewayError) -> grpc.Status:
    code = grpc.StatusCode[error.reason.grpc_code]
    details = [
        error_details_pb2.ErrorInfo(reason=error.reason.name, domain=ERROR_DOMAIN, metadata=error.metadata)
    ]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=packed)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def _rpc_name(method: str) -> str:
    # "/kpg.v1.EventStore/AppendEvents" -> "EventStore.AppendEvents"
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}.{name}"


class _Call:
    """Times one RPC and turns its outcome into a status, a metric and (for bugs) a log line."""

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self.started = time.perf_counter()
        self.code = "OK"
        self.reason: str | None = None

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(exc, GatewayError):
            status = to_status(exc)
            self.code, self.reason = status.code.name, exc.reason.name
            await context.abort(status.code, status.details, status.trailing_metadata)
        self.code, self.reason = "INTERNAL", "INTERNAL"
        log.error("unhandled error in %s", self.rpc, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.rpc}; see the gateway log")

    def done(self) -> None:
        observe("grpc", self.rpc, self.code, self.reason, time.perf_counter() - self.started)


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        rpc = _rpc_name(handler_call_details.method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(rpc, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(rpc, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # the API has no client-streaming RPCs


def _wrap(rpc: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    # Server-streaming handlers are async generators, or coroutines that call context.write().
    return _stream(rpc, behavior) if inspect.isasyncgenfunction(behavior) else _unary(rpc, behavior)


def _unary(rpc: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(rpc)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(exc, context)
        finally:
            call.done()

    return wrapper


def _stream(rpc: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _Call(rpc)
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(exc, context)
        finally:
            call.done()

    return wrapper
