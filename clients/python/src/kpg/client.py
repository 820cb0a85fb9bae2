"""`GatewayClient` (asyncio) and `error_details`, which reads the contract's error reason from an RpcError."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from kpg.v1 import (
    dead_letters_pb2_grpc,
    event_store_pb2_grpc,
    read_models_pb2_grpc,
    request_reply_pb2_grpc,
    sagas_pb2_grpc,
)

ERROR_DOMAIN = "kpg"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class GatewayClient:
    """One channel to a gateway and a stub per service: `async with GatewayClient("host:50051") as kpg:`."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None) -> None:
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.events = event_store_pb2_grpc.EventStoreStub(self.channel)
        self.read_models = read_models_pb2_grpc.ReadModelsStub(self.channel)
        self.sagas = sagas_pb2_grpc.SagasStub(self.channel)
        self.requests = request_reply_pb2_grpc.RequestReplyStub(self.channel)
        self.dead_letters = dead_letters_pb2_grpc.DeadLettersStub(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@dataclass(frozen=True)
class GatewayErrorDetails:
    """What the gateway says about a failed call: the contract's `reason`, its metadata, bad fields."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: dict[str, str] = field(default_factory=dict)


def error_details(error: grpc.RpcError) -> GatewayErrorDetails:
    """Decode `google.rpc.ErrorInfo` / `BadRequest` from a failed call (sync or asyncio)."""
    code = error.code()
    message = error.details() or ""
    reason, metadata, violations = "", {}, {}
    # (key, value) pairs at run time, whatever the stubs say: a tuple (sync API) or grpc.aio.Metadata.
    trailers: Iterable[tuple[str, str | bytes]] = cast(Any, error.trailing_metadata()) or ()
    for key, value in trailers:
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations = {v.field: v.description for v in bad.field_violations}
    return GatewayErrorDetails(code, message, reason, metadata, violations)
