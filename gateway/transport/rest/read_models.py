"""REST routes of kpg.v1.ReadModels."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse

from gateway.services.read_models import ReadModels
from gateway.transport import convert


def read_models_router(models: ReadModels) -> APIRouter:
    router = APIRouter(tags=["ReadModels"])

    @router.get("/v1/read-models", name="ReadModels.ListReadModels", operation_id="ReadModels.ListReadModels")
    async def list_read_models() -> dict[str, Any]:
        statuses = await models.list()
        return {"readModels": [convert.message_to_json(convert.status_to_pb(s)) for s in statuses]}

    @router.get(
        "/v1/read-models/{read_model}", name="ReadModels.GetStatus", operation_id="ReadModels.GetStatus"
    )
    async def get_status(read_model: str) -> dict[str, Any]:
        return convert.message_to_json(convert.status_to_pb(await models.status(read_model)))

    @router.get(
        "/v1/read-models/{read_model}/documents/{key}",
        name="ReadModels.Get",
        operation_id="ReadModels.Get",
        response_model=None,
    )
    async def get_document(
        read_model: str,
        key: str,
        min_position: Annotated[str, Query(alias="minPosition")] = "",
        wait_timeout_ms: Annotated[int, Query(alias="waitTimeoutMs", ge=0)] = 0,
    ) -> JSONResponse:
        document = await models.get(
            read_model, key, min_position=min_position, wait_timeout_ms=wait_timeout_ms
        )
        # The hot read path: the body is encoded once, not built as a message, then as a dict, then
        # validated against the return type (a third of the route's time).
        return JSONResponse(convert.document_to_json(document))

    @router.post(
        "/v1/read-models/{read_model}/query", name="ReadModels.Query", operation_id="ReadModels.Query"
    )
    async def query(
        read_model: str,
        body: Annotated[
            Any, Body(description="QueryRequest as proto3 JSON; filter ops may be short (EQ)")
        ] = None,
    ) -> dict[str, Any]:
        request = convert.query_body_to_pb(body, read_model=read_model)
        documents, next_page_token, position = await models.query(
            read_model,
            filters=convert.filters_from_pb(request.filters),
            order_by=request.order_by,
            descending=request.descending,
            limit=request.limit,
            page_token=request.page_token,
            min_position=request.min_position,
            wait_timeout_ms=request.wait_timeout_ms,
        )
        return {
            "documents": [convert.message_to_json(convert.document_to_pb(d)) for d in documents],
            "nextPageToken": next_page_token,
            "position": position,
        }

    @router.post(
        "/v1/read-models/{read_model}/rebuild", name="ReadModels.Rebuild", operation_id="ReadModels.Rebuild"
    )
    async def rebuild(read_model: str) -> dict[str, Any]:
        return convert.message_to_json(convert.status_to_pb(await models.rebuild(read_model)))

    return router
