"""kpg.v1.Sagas over gRPC: convert, call the service, convert back."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from kpg.v1 import sagas_pb2, sagas_pb2_grpc

from gateway.errors import SubscriberTooSlow
from gateway.services.sagas import Sagas
from gateway.transport import convert


class SagasServicer(sagas_pb2_grpc.SagasServicer):
    def __init__(self, sagas: Sagas, *, write_timeout_s: float) -> None:
        self._sagas = sagas
        self._write_timeout_s = write_timeout_s

    async def StartSaga(
        self, request: sagas_pb2.StartSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sagas_pb2.Saga:
        return convert.saga_to_pb(await self._sagas.start_saga(convert.start_saga_from_pb(request)))

    async def GetSaga(
        self, request: sagas_pb2.GetSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sagas_pb2.Saga:
        return convert.saga_to_pb(await self._sagas.get(request.saga_id))

    async def ListSagas(
        self, request: sagas_pb2.ListSagasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sagas_pb2.ListSagasResponse:
        page = await self._sagas.list_sagas(
            saga_type=request.saga_type,
            status=convert.saga_status_from_pb(request.status),
            limit=request.limit,
            page_token=request.page_token,
        )
        return sagas_pb2.ListSagasResponse(
            sagas=[convert.saga_to_pb(s) for s in page.sagas], next_page_token=page.next_page_token
        )

    async def WatchSaga(  # type: ignore[override]  # a coroutine that writes, to time each write out
        self, request: sagas_pb2.WatchSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        versions = await self._sagas.watch(request.saga_id)
        async for saga in versions:
            try:
                await asyncio.wait_for(context.write(convert.saga_to_pb(saga)), self._write_timeout_s)
            except TimeoutError:
                raise SubscriberTooSlow(
                    f"the watcher took no update for {self._write_timeout_s:.0f}s; GetSaga has the latest",
                    metadata={"saga_id": saga.saga_id},
                ) from None
