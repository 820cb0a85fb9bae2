"""REST routes of kpg.v1.Sagas: start, get, list, and watch as Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import StreamingResponse

from gateway.domain.sagas import Saga
from gateway.errors import GatewayError
from gateway.services.sagas import Sagas
from gateway.transport import convert
from gateway.transport.rest.errors import error_body
from gateway.transport.rest.sse import SseResponse


def sagas_router(sagas: Sagas, *, write_timeout_s: float) -> APIRouter:
    router = APIRouter(tags=["Sagas"])

    @router.post("/v1/sagas", name="Sagas.StartSaga", operation_id="Sagas.StartSaga")
    async def start_saga(
        body: Annotated[Any, Body(description="StartSagaRequest as proto3 JSON")] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, Any]:
        message = convert.start_saga_body_to_pb(body)
        if idempotency_key:
            message.idempotency_key = idempotency_key
        return convert.saga_to_json(await sagas.start_saga(convert.start_saga_from_pb(message)))

    @router.get("/v1/sagas", name="Sagas.ListSagas", operation_id="Sagas.ListSagas")
    async def list_sagas(
        saga_type: Annotated[str, Query(alias="sagaType")] = "",
        status: Annotated[
            str, Query(description="RUNNING, COMPLETED, COMPENSATING, COMPENSATED or FAILED")
        ] = "",
        limit: Annotated[int, Query(ge=0)] = 0,
        page_token: Annotated[str, Query(alias="pageToken")] = "",
    ) -> dict[str, Any]:
        status = status.removeprefix("SAGA_STATUS_")
        if status == "UNSPECIFIED":
            status = ""
        page = await sagas.list_sagas(saga_type=saga_type, status=status, limit=limit, page_token=page_token)
        return {"sagas": [convert.saga_to_json(s) for s in page.sagas], "nextPageToken": page.next_page_token}

    @router.get("/v1/sagas/{saga_id}", name="Sagas.GetSaga", operation_id="Sagas.GetSaga")
    async def get_saga(saga_id: str) -> dict[str, Any]:
        return convert.saga_to_json(await sagas.get(saga_id))

    @router.get(
        "/v1/sagas/{saga_id}/watch",
        name="Sagas.WatchSaga",
        operation_id="Sagas.WatchSaga",
        response_class=StreamingResponse,
    )
    async def watch_saga(saga_id: str) -> StreamingResponse:
        """Server-Sent Events: one `saga` event per change (`id` is the saga's version), ending after a final
        status; a bad id or an unknown saga fails before the stream opens."""
        versions = await sagas.watch(saga_id)
        return SseResponse(_sse(versions), write_timeout_s=write_timeout_s)

    return router


async def _sse(versions: AsyncIterator[Saga]) -> AsyncIterator[str]:
    try:
        async for saga in versions:
            yield f"id: {saga.version}\nevent: saga\ndata: {json.dumps(convert.saga_to_json(saga))}\n\n"
    except GatewayError as exc:
        yield f"event: error\ndata: {json.dumps(error_body(exc))}\n\n"
